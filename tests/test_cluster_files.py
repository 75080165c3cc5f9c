"""The deployment files agree with each other and with the code: cluster/ (Ray cluster launcher, KubeRay),
infra/ (Terraform, MLflow server) and jobs/*-nsd.yaml.

No cloud, no cluster: the launcher YAML goes through Ray's own schema and config preparation, Terraform is
parsed with python-hcl2, the KubeRay manifests with PyYAML, and the names that must match across files
(buckets, instance profiles, roles, service accounts, the MLflow URI, environment variables) are compared.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER = CLUSTER / "aws-gpu.yaml"
TERRAFORM = ROOT / "infra" / "terraform"
MLFLOW = ROOT / "infra" / "mlflow"
JOBS = ROOT / "jobs"
NSD_PUBLIC_BUCKET = "natural-scenes-dataset"

S3_URI = re.compile(r"s3://([a-z0-9][a-z0-9.-]*[a-z0-9])(/[^\s'\"]*)?")
S3_OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


def _stage_configs() -> dict:
    from raydecode.config import (
        DiffusionDecodeConfig,
        EmbedConfig,
        EvaluateConfig,
        IngestMindEye2Config,
        IngestNSDConfig,
        IngestSyntheticConfig,
        StageConfig,
        SweepConfig,
        TrainConfig,
    )

    return {"pretrain": TrainConfig, "sweep": SweepConfig, "dynadiff": DiffusionDecodeConfig,
            "embed": EmbedConfig, "evaluate": EvaluateConfig, "ingest": IngestNSDConfig, "ingest-nsd": IngestNSDConfig,
            "ingest-synthetic": IngestSyntheticConfig, "ingest-mindeye2": IngestMindEye2Config,
            "promote": StageConfig}


# -- loaders -------------------------------------------------------------------------------------------------------


def _yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@functools.lru_cache(maxsize=None)
def _launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


@functools.lru_cache(maxsize=None)
def _kuberay() -> dict[str, list]:
    files = sorted(KUBERAY.rglob("*.yaml"))
    assert files, "no KubeRay manifests under cluster/kuberay/"
    return {str(p.relative_to(ROOT)): _yaml_docs(p) for p in files}


def _kind(kind: str) -> list[tuple[str, dict]]:
    return [(f, d) for f, docs in _kuberay().items() for d in docs if d.get("kind") == kind]


@functools.lru_cache(maxsize=None)
def _mlflow_k8s() -> list:
    return _yaml_docs(MLFLOW / "k8s.yaml")


def _strip_blocks(node):
    if isinstance(node, dict):
        return {k.strip('"'): _strip_blocks(v) for k, v in node.items() if k != "__is_block__"}
    if isinstance(node, list):
        return [_strip_blocks(v) for v in node]
    if isinstance(node, str) and len(node) >= 2 and node[0] == node[-1] == '"':
        return node[1:-1]
    return node


@functools.lru_cache(maxsize=None)
def _tf() -> dict[str, list]:
    """All blocks of infra/terraform/*.tf, merged by block kind (resource, data, variable, ...)."""
    import hcl2

    opts = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)
    merged: dict[str, list] = {}
    for path in sorted(TERRAFORM.glob("*.tf")):
        with path.open() as fh:
            parsed = _strip_blocks(hcl2.load(fh, serialization_options=opts))
        for kind, blocks in parsed.items():
            merged.setdefault(kind, []).extend(blocks if isinstance(blocks, list) else [blocks])
    return merged


def _tf_blocks(kind: str) -> list[tuple[str, str, dict]]:
    """(type, name, body) of every `kind "type" "name" {...}` block (resource, data)."""
    out = []
    for block in _tf().get(kind, []):
        for typ, named in block.items():
            for name, body in named.items():
                out.append((typ, name, body))
    return out


def _tf_block(kind: str, typ: str, name: str) -> dict:
    found = [b for t, n, b in _tf_blocks(kind) if (t, n) == (typ, name)]
    assert len(found) == 1, f"expected one {kind} {typ}.{name} in infra/terraform, found {len(found)}"
    return found[0]


@functools.lru_cache(maxsize=None)
def _tf_vars() -> dict[str, object]:
    out = {}
    for block in _tf().get("variable", []):
        for name, body in block.items():
            out[name] = body.get("default")
    return out


def _tf_locals() -> dict:
    out: dict = {}
    for block in _tf().get("locals", []):
        out.update(block)
    return out


def _resolve(expr: str) -> str:
    """A Terraform string with its ${var.NAME} references replaced by the variables' defaults."""
    return re.sub(r"\$\{var\.(\w+)\}", lambda m: str(_tf_vars()[m.group(1)]), expr)


def _as_list(x) -> list:
    return x if isinstance(x, list) else [x]


def _one(x):
    """The single nested block (python-hcl2 gives nested blocks as lists)."""
    (only,) = _as_list(x)
    return only


@functools.lru_cache(maxsize=None)
def _tf_buckets() -> dict[str, str]:
    """Bucket key (data, checkpoints, mlflow, code) -> default bucket name."""
    body = _tf_block("resource", "aws_s3_bucket", "this")
    assert body["for_each"] == "${local.buckets}" and body["bucket"] == "${each.value}"
    return {k: _resolve(v) for k, v in _tf_locals()["buckets"].items()}


def _jobs_nsd() -> list[Path]:
    files = sorted(JOBS.glob("*-nsd.yaml"))
    assert files, "no jobs/*-nsd.yaml"
    return files


def _job_stage(path: Path) -> str:
    """The stage a job file runs: its first line is the command that submits it (``... raydecode <stage> --config
    jobs/<file>``)."""
    first = path.read_text().splitlines()[0]
    found = re.search(r"raydecode (\w+(?: \w+)?) --config jobs/" + re.escape(path.name), first)
    assert found, f"{path.name}: its first line must be the command that runs it, not {first!r}"
    return found.group(1).replace(" ", "-")  # ingest nsd -> ingest-nsd


def _jobs_tracking_uris() -> set[str]:
    return {yaml.safe_load(p.read_text()).get("tracking_uri") for p in _jobs_nsd()} - {None}


def _pyproject_mlflow_spec() -> str:
    (spec,) = re.findall(r'^\s*"(mlflow[<>=!~][^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M)
    return spec.replace(" ", "")


# -- jobs ----------------------------------------------------------------------------------------------------------


def test_nsd_jobs_load_and_use_one_data_bucket_and_one_checkpoint_bucket():
    configs = _stage_configs()
    from raydecode.config import load_config

    buckets = _tf_buckets()
    for path in _jobs_nsd():
        stage = _job_stage(path)
        assert stage in configs, f"{path.name}: add its stage's config class to this test"
        cfg = load_config(configs[stage], str(path))
        assert S3_URI.fullmatch(cfg.store).group(1) == buckets["data"], f"{path.name}: store {cfg.store}"
        for where, uri in (("checkpoint.storage_path", getattr(getattr(cfg, "checkpoint", None), "storage_path", None)),
                           ("init_from", getattr(cfg, "init_from", None))):
            if uri and uri.startswith("s3://"):
                assert S3_URI.fullmatch(uri).group(1) == buckets["checkpoints"], f"{path.name}: {where} {uri}"


def test_nsd_jobs_take_every_weight_from_one_weights_root():
    """One convention: every pretrained weight a *-nsd.yaml names is under the lab's weights root, which every node
    fetches from (raydecode.weights): no per-file local roots that nothing in cluster/ mounts."""
    def refs(node, key=None):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from refs(v, k)
        elif isinstance(node, list):
            for v in node:
                yield from refs(v, key)
        elif key in ("weights", "unet", "path", "ip_adapter") and isinstance(node, str):
            yield node

    found = {p.name: list(refs(yaml.safe_load(p.read_text()))) for p in _jobs_nsd()}
    every = [r for rs in found.values() for r in rs]
    assert len(every) >= 10 and {n for n, rs in found.items() if rs} == {"embed-nsd.yaml", "dynadiff-nsd.yaml",
                                                                         "evaluate-nsd.yaml", "pretrain-nsd.yaml",
                                                                         "sweep-nsd.yaml",
                                                                         "evaluate-mindlink-nsd.yaml"}, found
    assert all(r.startswith(f"s3://{_tf_buckets()['data']}/weights/") for r in every), every


def test_terraform_buckets_are_the_buckets_the_jobs_and_mlflow_name():
    buckets = _tf_buckets()
    assert set(buckets) == {"data", "checkpoints", "mlflow", "code"}
    in_jobs = {m.group(1) for p in _jobs_nsd() for m in S3_URI.finditer(p.read_text())}  # comments included
    # besides the lab's two buckets, the ingests read NSD's public bucket (anonymously, never written)
    assert in_jobs == {buckets["data"], buckets["checkpoints"], NSD_PUBLIC_BUCKET}, in_jobs
    server_files = (MLFLOW / "k8s.yaml").read_text() + (MLFLOW / "mlflow.service").read_text()
    mlflow_dest = {m.group(1) for m in S3_URI.finditer(server_files)}
    assert mlflow_dest == {buckets["mlflow"]}, mlflow_dest
    # every s3:// URI in a deployment file names one of the four buckets
    for path in [*CLUSTER.rglob("*"), *(ROOT / "infra").rglob("*")]:
        if path.is_file() and "local" not in path.relative_to(ROOT).parts[:2]:
            for m in S3_URI.finditer(path.read_text(errors="replace")):
                assert m.group(1) in buckets.values(), f"{path.relative_to(ROOT)}: {m.group(0)}"


def test_terraform_buckets_are_private_versioned_and_encrypted():
    for typ in ("aws_s3_bucket_versioning", "aws_s3_bucket_public_access_block",
                "aws_s3_bucket_server_side_encryption_configuration", "aws_s3_bucket_policy"):
        assert _tf_block("resource", typ, "this" if typ != "aws_s3_bucket_policy" else "tls_only")["for_each"] \
            == "${aws_s3_bucket.this}", typ
    versioning = _tf_block("resource", "aws_s3_bucket_versioning", "this")
    assert _one(versioning["versioning_configuration"])["status"] == "Enabled"
    pab = _tf_block("resource", "aws_s3_bucket_public_access_block", "this")
    assert all(pab[k] is True for k in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                                        "restrict_public_buckets")), pab
    sse = _one(_one(_tf_block("resource", "aws_s3_bucket_server_side_encryption_configuration", "this")["rule"])
               ["apply_server_side_encryption_by_default"])
    assert sse["sse_algorithm"] in ("AES256", "aws:kms")


# -- Terraform IAM ---------------------------------------------------------------------------------------------------


def _statement_buckets(doc_for_each, statement) -> set[tuple[str, bool]]:
    """(bucket key, is-object-ARN) for every resource of an S3 statement; fails on anything else."""
    out = set()
    for res in _as_list(statement["resources"]):
        m = re.fullmatch(r'\$\{aws_s3_bucket\.this\["(\w+)"\]\.arn\}(/\*)?', res)
        if m:
            out.add((m.group(1), bool(m.group(2))))
            continue
        m = re.fullmatch(r"\$\{each\.value\.arn\}(/\*)?", res)
        assert m and doc_for_each == "${aws_s3_bucket.this}", f"S3 statement resource {res!r} is not one of the buckets"
        out |= {(k, bool(m.group(1))) for k in _tf_buckets()}
    return out


def test_iam_s3_policies_name_only_the_four_buckets_and_four_actions():
    grants: dict[str, dict[str, set]] = {}
    for typ, name, body in _tf_blocks("data"):
        if typ != "aws_iam_policy_document":
            continue
        for st in _as_list(body.get("statement", [])):
            actions = set(_as_list(st["actions"]))
            s3 = {a for a in actions if a.startswith("s3:")}
            if not s3:
                continue
            if st.get("effect", "Allow") == "Deny":
                continue  # the buckets' TLS-only policies
            assert s3 == actions, f"{name}: S3 and other actions in one statement"
            assert s3 <= {"s3:ListBucket"} | S3_OBJECT_ACTIONS, f"{name}: {sorted(s3)}"
            for key, is_object in _statement_buckets(body.get("for_each"), st):
                assert is_object == (s3 != {"s3:ListBucket"}), f"{name}: {sorted(s3)} on {key} (objects: {is_object})"
                grants.setdefault(name, {}).setdefault(key, set()).update(s3)
    read_write = {"s3:ListBucket"} | S3_OBJECT_ACTIONS
    # the Ray nodes read the code bucket and never write it; only the publisher (CI / maintainers) uploads there
    assert grants == {"ray_s3": {"data": read_write, "checkpoints": read_write,
                                 "code": {"s3:ListBucket", "s3:GetObject"}},
                      "mlflow_s3": {"mlflow": read_write},
                      "code_publisher": {"code": {"s3:ListBucket", "s3:GetObject", "s3:PutObject"}}}, grants
    # the policies are attached as they are: no AWS managed policy (e.g. AmazonS3FullAccess) anywhere
    for typ, name, body in _tf_blocks("resource"):
        if typ == "aws_iam_role_policy_attachment":
            assert re.fullmatch(r"\$\{aws_iam_policy\.(ray_s3|mlflow_s3)\.arn\}", body["policy_arn"]), (name, body)
        if typ in ("aws_iam_policy", "aws_iam_role_policy"):
            assert body["policy"].startswith("${data.aws_iam_policy_document."), (name, body["policy"])


def _doc_statements(body: dict) -> list[dict]:
    """The statements of an aws_iam_policy_document, those of its dynamic "statement" blocks included."""
    out = list(_as_list(body.get("statement", [])))
    for dyn in _as_list(body.get("dynamic", [])):
        if "statement" in dyn:
            out += _as_list(_one(_as_list(dyn["statement"]))["content"])
    return out


def _allows(actions, action: str) -> bool:
    """Whether one of a statement's action patterns (s3:*, s3:Put*, *) covers `action`."""
    return any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(actions))


def _s3_resource_buckets(res: str, doc_for_each) -> set[str]:
    """The bucket keys whose objects or bucket an IAM resource string covers ("*" covers them all)."""
    names = _tf_buckets()
    if res in ("*", "arn:aws:s3:::*"):
        return set(names)
    m = re.match(r'\$\{aws_s3_bucket\.this\["(\w+)"\]\.arn\}', res)
    if m:
        return {m.group(1)}
    if res.startswith("${each.value.arn}") and doc_for_each == "${aws_s3_bucket.this}":
        return set(names)
    m = re.match(r"arn:[^:]+:s3:::([^/]+)", res)
    return {k for k, b in names.items() if m and fnmatch.fnmatchcase(b, m.group(1))}


# the Terraform roles that run Ray code (the launcher's nodes, the KubeRay pods)
RAY_ROLES = {"ray_head", "ray_worker", "ray_irsa"}


def _ray_role_policy_docs() -> dict[str, set[str]]:
    """Terraform role -> the aws_iam_policy_document names attached to it (managed and inline), for the roles
    that run Ray code."""
    policies = {n: b for t, n, b in _tf_blocks("resource") if t == "aws_iam_policy"}
    role_ref = re.compile(r"\$\{aws_iam_role\.(\w+)(?:\[0\])?\.(?:name|id)\}")
    doc_ref = re.compile(r"\$\{data\.aws_iam_policy_document\.(\w+)(?:\[0\])?\.json\}")
    out: dict[str, set[str]] = {}
    for typ, name, body in _tf_blocks("resource"):
        if typ == "aws_iam_role_policy_attachment":
            policy = re.fullmatch(r"\$\{aws_iam_policy\.(\w+)\.arn\}", body["policy_arn"]).group(1)
            doc_expr = policies[policy]["policy"]
        elif typ == "aws_iam_role_policy":
            doc_expr = body["policy"]
        else:
            continue
        role = role_ref.fullmatch(body["role"]).group(1)
        out.setdefault(role, set()).add(doc_ref.fullmatch(doc_expr).group(1))
    return {role: docs for role, docs in out.items() if role in RAY_ROLES}


def test_rayjobs_run_code_from_a_bucket_no_ray_role_can_write():
    """A job that could write where jobs fetch their code from could replace the code every later job runs: the
    RayJobs' working_dir is in the code bucket, no Ray role may put or delete objects there (no Allow, and the
    bucket policy denies it), and only the publisher policy for CI / maintainers uploads."""
    buckets = _tf_buckets()
    dirs = {f: yaml.safe_load(d["spec"]["runtimeEnvYAML"])["working_dir"] for f, d in _kind("RayJob")}
    assert len(dirs) == 2, dirs
    for f, uri in dirs.items():
        assert S3_URI.fullmatch(uri).group(1) == buckets["code"], f"{f}: working_dir {uri}"
    assert buckets["code"] not in {buckets[k] for k in ("data", "checkpoints", "mlflow")}

    docs = {n: b for t, n, b in _tf_blocks("data") if t == "aws_iam_policy_document"}
    attached = _ray_role_policy_docs()
    assert set(attached) == RAY_ROLES and {"ray_s3", "ray_autoscaler"} <= attached["ray_head"], attached
    for role, names in attached.items():
        for name in names:
            for st in _doc_statements(docs[name]):
                if st.get("effect", "Allow") != "Allow":
                    continue
                writes = [a for a in ("s3:PutObject", "s3:DeleteObject") if _allows(st["actions"], a)]
                covered = set().union(*(_s3_resource_buckets(r, docs[name].get("for_each"))
                                        for r in _as_list(st["resources"])))
                assert not (writes and "code" in covered), f"{role} ({name}): {writes} on the code bucket"
    assert any(_allows(st["actions"], "s3:GetObject") and "code" in set().union(
        *(_s3_resource_buckets(r, None) for r in _as_list(st["resources"]))) for st in _doc_statements(docs["ray_s3"]))

    # the publisher uploads to the code bucket and is attached to no role here (CI / maintainers attach it)
    publish = [st for st in _doc_statements(docs["code_publisher"]) if _allows(st["actions"], "s3:PutObject")]
    assert publish and all(set().union(*(_s3_resource_buckets(r, None) for r in _as_list(st["resources"])))
                           == {"code"} for st in publish), publish
    assert _tf_block("resource", "aws_iam_policy", "code_publisher")["policy"] == \
        "${data.aws_iam_policy_document.code_publisher.json}"
    assert not any("code_publisher" in json.dumps(b) for t, _, b in _tf_blocks("resource")
                   if t in ("aws_iam_role_policy_attachment", "aws_iam_role_policy", "aws_iam_policy_attachment"))
    outputs = {n: b for block in _tf()["output"] for n, b in block.items()}
    assert outputs["code_publisher_policy_arn"]["value"] == "${aws_iam_policy.code_publisher.arn}"
    assert outputs["code_bucket"]["value"] == '${aws_s3_bucket.this["code"].bucket}'

    # the code bucket's policy denies every Ray role any object write, whatever is attached to them later
    bucket_doc = docs["tls_only"]
    assert _tf_block("resource", "aws_s3_bucket_policy", "tls_only")["policy"] == \
        "${data.aws_iam_policy_document.tls_only[each.key].json}"
    (dyn,) = [_one(_as_list(d["statement"])) for d in _as_list(bucket_doc.get("dynamic", [])) if "statement" in d]
    assert re.search(r'each\.key == "code"', dyn["for_each"]), dyn["for_each"]
    (deny,) = _as_list(dyn["content"])
    assert deny["effect"] == "Deny" and _as_list(deny["resources"]) == ["${each.value.arn}/*"], deny
    assert all(_allows(deny["actions"], a) for a in ("s3:PutObject", "s3:DeleteObject", "s3:DeleteObjectVersion"))
    (cond,) = _as_list(deny["condition"])
    assert (cond["test"], cond["variable"]) == ("ArnEquals", "aws:PrincipalArn"), cond
    assert cond["values"] == "${local.ray_role_arns}", cond
    named = set(re.findall(r"aws_iam_role\.(\w+)(?:\[\*\]|\[0\])?\.arn", _tf_locals()["ray_role_arns"]))
    assert named == RAY_ROLES, named


EC2_READ_ACTIONS = ("ec2:describe", "ec2:get", "ec2:list")


def _ec2_write_on_everything(st: dict) -> list[str]:
    """The EC2 write actions (anything but Describe/Get/List, wildcards included) an Allow statement grants on
    "*" without a condition."""
    if st.get("effect", "Allow") != "Allow" or st.get("condition"):
        return []
    if "*" not in _as_list(st.get("resources", [])):
        return []
    return [a for a in _as_list(st["actions"])
            if (a == "*" or a.lower().startswith("ec2:")) and not a.lower().startswith(EC2_READ_ACTIONS)]


def test_no_iam_statement_allows_ec2_writes_on_everything_without_a_condition():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    # the check itself catches what it is for
    assert _ec2_write_on_everything({"effect": "Allow", "actions": ["ec2:RunInstances"], "resources": ["*"]})
    assert _ec2_write_on_everything({"actions": ["ec2:*"], "resources": ["*"]})
    assert not _ec2_write_on_everything({"actions": ["ec2:DescribeInstances"], "resources": ["*"]})
    for typ, name, body in _tf_blocks("data"):
        if typ == "aws_iam_policy_document":
            for st in _doc_statements(body):
                assert not _ec2_write_on_everything(st), f"{name}: {st.get('sid')} {_ec2_write_on_everything(st)}"

    # RunInstances, resource by resource: the instance only with this cluster's tag in the request, and no other
    # kind of resource wholesale without a condition (but the volumes, which a launch can only create)
    doc = _tf_block("data", "aws_iam_policy_document", "ray_autoscaler")
    launches = [st for st in _as_list(doc["statement"]) if _allows(st["actions"], "ec2:RunInstances")]
    kinds: dict[str, dict] = {}
    for st in launches:
        assert _as_list(st["actions"]) == ["ec2:RunInstances"], st
        for res in _as_list(st["resources"]):
            if res == "${local.instance_arn}":
                kind, ident = "instance", "*"
            elif res == "${aws_security_group.ray[0].arn}":
                kind, ident = "security-group", "sg-ray"
            else:
                kind, ident = re.search(r":([a-z-]+)/([^/:]+)$", res).groups()
            kinds[kind] = st
            if ident == "*" and kind != "volume":
                assert st.get("condition"), f"{st['sid']}: RunInstances on every {kind} without a condition"
    assert {"instance", "subnet", "network-interface", "security-group", "image", "volume"} <= set(kinds), kinds
    assert _tf_locals()["instance_arn"].endswith(":instance/*")
    (tag,) = _as_list(kinds["instance"]["condition"])
    assert (tag["test"], tag["variable"], tag["values"]) == (
        "StringEquals", f"aws:RequestTag/{TAG_RAY_CLUSTER_NAME}", ["${var.ray_cluster_name}"]), tag
    for kind in ("subnet", "network-interface"):
        (vpc,) = _as_list(kinds[kind]["condition"])
        assert vpc["variable"] == "ec2:Vpc" and _as_list(vpc["values"])[0].endswith("vpc/${var.vpc_id}"), vpc
    (owner,) = _as_list(kinds["image"]["condition"])
    assert (owner["variable"], owner["values"]) == ("ec2:Owner", "${var.gpu_ami_owners}"), owner
    assert _tf_block("data", "aws_ami", "gpu")["owners"] == "${var.gpu_ami_owners}"
    # Ray's node provider puts the ray-cluster-name tag into the launch request (TagSpecifications of the
    # instance), which is what aws:RequestTag sees
    provider = Path(importlib.util.find_spec("ray").origin).parent / "autoscaler/_private/aws/node_provider.py"
    create = re.search(r"def _create_node\(.*?(?=\n    def )", provider.read_text(), re.S).group(0)
    assert re.search(r'"Key":\s*TAG_RAY_CLUSTER_NAME', create) and '"ResourceType": "instance"' in create
    assert re.search(r'"TagSpecifications":\s*tag_specs', create) and "create_instances(**conf)" in create


def test_autoscaler_policy_is_limited_to_its_own_cluster():
    from ray.autoscaler.tags import TAG_RAY_CLUSTER_NAME

    doc = _tf_block("data", "aws_iam_policy_document", "ray_autoscaler")
    for st in _as_list(doc["statement"]):
        actions = set(_as_list(st["actions"]))
        assert not any(a.startswith(("s3:", "iam:Create", "iam:Put", "iam:Attach")) or a.endswith(":*")
                       for a in actions), actions
        if actions & {"ec2:TerminateInstances", "ec2:StopInstances"}:
            (cond,) = _as_list(st["condition"])
            assert cond["variable"] == f"aws:ResourceTag/{TAG_RAY_CLUSTER_NAME}"
            assert cond["values"] == ["${var.ray_cluster_name}"]
        if "iam:PassRole" in actions:
            assert st["resources"] == ["${aws_iam_role.ray_worker.arn}"]
    assert _tf_vars()["ray_cluster_name"] == _launcher()["cluster_name"]


def test_security_groups_open_only_ssh_from_the_admin_cidr():
    ingress = [b for t, _, b in _tf_blocks("resource") if t == "aws_vpc_security_group_ingress_rule"]
    assert ingress
    for rule in ingress:
        assert "cidr_ipv6" not in rule and "prefix_list_id" not in rule, rule
        if "cidr_ipv4" in rule:
            assert rule["cidr_ipv4"] == "${var.admin_cidr}", rule
            assert (rule["ip_protocol"], rule["from_port"], rule["to_port"]) == ("tcp", 22, 22), rule
        else:
            assert rule["referenced_security_group_id"].startswith("${aws_security_group."), rule
    for typ, name, body in _tf_blocks("resource"):
        assert not (typ == "aws_security_group" and "ingress" in body), f"{name}: inline ingress rules"
    assert _tf_vars()["admin_cidr"] == ""  # no default: a user must name their network


def test_terraform_outputs_and_formatting():
    outputs = {name for block in _tf()["output"] for name in block}
    assert {"ray_head_instance_profile_arn", "ray_worker_instance_profile_arn", "ray_head_role_arn",
            "ray_worker_role_arn", "ray_irsa_role_arn", "mlflow_role_arn", "data_bucket", "checkpoint_bucket",
            "mlflow_bucket", "ray_security_group_id", "code_bucket", "code_publisher_policy_arn"} <= outputs
    if shutil.which("terraform") is None:
        pytest.skip("terraform is not installed: parsed with python-hcl2 only")
    proc = subprocess.run(["terraform", "fmt", "-check", "-diff", "."], cwd=TERRAFORM, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# -- the Ray cluster launcher ----------------------------------------------------------------------------------------


def test_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _launcher()
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(copy.deepcopy(cfg)))  # what `ray up` does before it touches AWS
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = {n["node_config"]["InstanceType"]: n for k, n in nodes.items() if k != cfg["head_node_type"]}
    assert {"p4d.24xlarge", "p5.48xlarge"} <= set(gpu)
    for n in gpu.values():
        assert n["resources"]["GPU"] == 8 and 0 <= n["min_workers"] <= n["max_workers"] <= cfg["max_workers"]


def test_launcher_keeps_token_auth_and_a_closed_network():
    cfg = _launcher()
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"] == _tf_vars()["region"]
    # token authentication: the mode on every node, the client's token file mounted on every node
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in cfg[key] if "ray start" in c]
        assert starts and all(re.search(r"\bRAY_AUTH_MODE=token ray start\b", c) for c in starts), key
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    # no launcher-made security group (its default opens SSH to 0.0.0.0/0) and no extra open ports
    assert "security_group" not in cfg["provider"]
    profiles = {name: _resolve(_tf_block("resource", "aws_iam_instance_profile", name)["name"])
                for name in ("ray_head", "ray_worker")}
    for key, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        assert nc.get("SecurityGroupIds"), f"{key}: SecurityGroupIds"
        want = profiles["ray_head" if key == cfg["head_node_type"] else "ray_worker"]
        assert re.fullmatch(rf"arn:aws:iam::\w+:instance-profile/{re.escape(want)}", nc["IamInstanceProfile"]["Arn"])
    assert _tf_block("resource", "aws_iam_instance_profile", "ray_worker")["role"] == "${aws_iam_role.ray_worker.name}"
    # the project is installed on every node from the synced working copy
    (remote,) = [r for r, local in cfg["file_mounts"].items() if local == "."]
    assert any(re.search(rf"\bpip install\b.*\s{re.escape(remote)}(\s|$)", c) for c in cfg["setup_commands"])


# -- KubeRay -----------------------------------------------------------------------------------------------------------


def _cluster_specs() -> list[tuple[str, dict]]:
    specs = [(f, d["spec"]) for f, d in _kind("RayCluster")]
    specs += [(f, d["spec"]["rayClusterSpec"]) for f, d in _kind("RayJob")]
    return specs


def _pod_specs(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]


def test_kuberay_manifests_parse_and_have_the_expected_kinds():
    kinds = [d.get("kind") for docs in _kuberay().values() for d in docs]
    assert {"Namespace", "ServiceAccount", "ConfigMap", "RayCluster", "RayJob"} <= set(kinds), kinds
    assert "Secret" not in kinds  # the auth token Secret is created by hand, never committed
    assert sorted(Path(f).name for f, _ in _kind("RayJob")) == ["rayjob-pretrain.yaml", "rayjob-sweep.yaml"]
    (ns,) = [d["metadata"]["name"] for _, d in _kind("Namespace")]
    for docs in _kuberay().values():
        for d in docs:
            assert d["apiVersion"] and d["metadata"]["name"]
            if d["kind"] != "Namespace":
                assert d["metadata"]["namespace"] == ns, d["metadata"]
            assert d["kind"] not in ("Ingress", "Service"), "the dashboard is reached by port-forwarding only"


def test_rayjobs_run_a_stage_config_and_clean_up():
    from raydecode.app.cli import build_parser
    from raydecode.config import load_config

    configs = _stage_configs()
    for f, job in _kind("RayJob"):
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True, f
        assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0, f
        argv = shlex.split(spec["entrypoint"])
        stage = Path(f).stem.removeprefix("rayjob-")
        assert argv == ["raydecode", stage, "--config", f"jobs/{stage}-nsd.yaml"], spec["entrypoint"]
        assert (ROOT / argv[3]).is_file(), argv[3]
        args = build_parser().parse_args(argv[1:])
        assert args.stage == stage
        load_config(configs[stage], str(ROOT / args.config))
        env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert S3_URI.fullmatch(env["working_dir"]).group(1) == _tf_buckets()["code"], env
        assert env["working_dir"].endswith(".zip"), env


def test_ray_clusters_autoscale_gpu_workers_with_token_auth():
    (sa,) = [d["metadata"]["name"] for _, d in _kind("ServiceAccount")]
    (cm,) = [d["metadata"]["name"] for _, d in _kind("ConfigMap")]
    images = set()
    for f, spec in _cluster_specs():
        assert spec["authOptions"]["mode"] == "token", f
        assert spec["enableInTreeAutoscaling"] is True, f
        assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP", f
        assert not spec["headGroupSpec"].get("enableIngress", False), f
        assert spec["workerGroupSpecs"], f
        for group in spec["workerGroupSpecs"]:
            assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], group["groupName"]
            assert group["maxReplicas"] > 0, group["groupName"]
            (ray,) = [c for c in group["template"]["spec"]["containers"] if c["name"] == "ray-worker"]
            gpus = {ray["resources"][k].get("nvidia.com/gpu") for k in ("requests", "limits")}
            assert len(gpus) == 1 and int(gpus.pop()) > 0, f"{f}: {group['groupName']} requests no nvidia.com/gpu"
        for pod in _pod_specs(spec):
            assert pod["serviceAccountName"] == sa, f
            ray = pod["containers"][0]
            assert {"configMapRef": {"name": cm}} in ray.get("envFrom", []), f
            images.add(ray["image"])
            assert "RAY_AUTH_MODE" not in {e["name"] for e in ray.get("env", [])}, "authOptions sets it"
    assert len(images) == 1, images


def test_service_accounts_assume_the_terraform_irsa_roles():
    v = _tf_vars()
    for docs, ns_var, sa_var, role in ((_kuberay(), "k8s_namespace", "k8s_service_account", "ray_irsa"),
                                       ({"mlflow": _mlflow_k8s()}, "mlflow_k8s_namespace", "mlflow_k8s_service_account",
                                        "mlflow_irsa")):
        (sa,) = [d for ds in docs.values() for d in ds if d["kind"] == "ServiceAccount"]
        assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == (v[ns_var], v[sa_var])
        role_name = _resolve(_tf_block("resource", "aws_iam_role", role)["name"])
        arn = sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(rf"arn:aws:iam::\w+:role/{re.escape(role_name)}", arn), arn


# -- MLflow ------------------------------------------------------------------------------------------------------------


def _mlflow_flags(argv: list[str]) -> dict[str, str | bool]:
    flags: dict[str, str | bool] = {}
    i = argv.index("server") + 1
    while i < len(argv):
        if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            flags[argv[i]] = argv[i + 1]
            i += 2
        else:
            flags[argv[i]] = True
            i += 1
    return flags


def test_mlflow_server_is_where_the_jobs_log():
    (uri,) = _jobs_tracking_uris()
    host_port = uri.removeprefix("http://")
    host, port = host_port.split(":")
    (cm,) = [d for _, d in _kind("ConfigMap")]
    assert cm["data"]["MLFLOW_TRACKING_URI"] == uri
    assert f"export MLFLOW_TRACKING_URI={uri}" in " ".join(_launcher()["setup_commands"])
    assert cm["data"]["AWS_REGION"] == _tf_vars()["region"]

    (svc,) = [d for d in _mlflow_k8s() if d["kind"] == "Service"]
    assert f"{svc['metadata']['name']}.{svc['metadata']['namespace']}" == host  # <service>.<namespace> in-cluster
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP" and svc["spec"]["ports"][0]["port"] == int(port)
    (deploy,) = [d for d in _mlflow_k8s() if d["kind"] == "Deployment"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    unit = (MLFLOW / "mlflow.service").read_text()
    exec_start = re.search(r"^ExecStart=(.*?)(?<!\\)$", unit, re.M | re.S).group(1).replace("\\\n", " ")
    bucket = _tf_buckets()["mlflow"]
    for where, argv in (("k8s.yaml", container["command"]), ("mlflow.service", shlex.split(exec_start))):
        flags = _mlflow_flags(argv)
        assert flags["--serve-artifacts"] is True and flags["--host"] == "0.0.0.0" and flags["--port"] == port, where
        assert S3_URI.fullmatch(flags["--artifacts-destination"]).group(1) == bucket, where
        assert host_port in flags["--allowed-hosts"].split(","), where
        assert flags["--backend-store-uri"] in ("$(MLFLOW_BACKEND_STORE_URI)", "${MLFLOW_BACKEND_STORE_URI}"), where
    (db,) = [e for e in container["env"] if e["name"] == "MLFLOW_BACKEND_STORE_URI"]
    assert "secretKeyRef" in db["valueFrom"], "the database URI (with its password) comes from a Secret"
    assert "postgresql://" in (MLFLOW / "mlflow.env.example").read_text()
    # the server's mlflow is the clients' (pyproject.toml)
    spec = _pyproject_mlflow_spec()
    for path in (MLFLOW / "Dockerfile", MLFLOW / "README.md"):
        assert f'"{spec}"' in path.read_text().replace(" ", ""), f"{path.name} does not pin {spec}"


# KubeRay's label on every Ray pod it creates (ray-operator/controllers/ray/utils/constant.go: RayNodeLabelKey)
KUBERAY_NODE_LABEL = {"ray.io/is-ray-node": "yes"}
MLFLOW_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def test_mlflow_server_admits_only_the_ray_pods():
    """The server has no authentication of its own: a NetworkPolicy selects its pod and admits only the Ray pods
    of the KubeRay namespace, on the server's port; MLflow credentials, if ever given to the Ray pods, come from a
    Secret."""
    (deploy,) = [d for d in _mlflow_k8s() if d["kind"] == "Deployment"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    ports = {p["containerPort"] for p in container["ports"]} | {p["name"] for p in container["ports"]}
    (kuberay_ns,) = [d["metadata"]["name"] for _, d in _kind("Namespace")]
    policies = [d for d in _mlflow_k8s() if d["kind"] == "NetworkPolicy"]
    selecting = [p for p in policies if p["metadata"]["namespace"] == deploy["metadata"]["namespace"]
                 and p["spec"]["podSelector"].get("matchLabels")
                 and p["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()]
    assert len(selecting) == 1 and len(policies) == 1, "one NetworkPolicy, selecting the MLflow pod"
    spec = selecting[0]["spec"]
    assert "matchExpressions" not in spec["podSelector"]
    assert "Ingress" in spec["policyTypes"] and spec["ingress"], spec
    for rule in spec["ingress"]:
        # an ingress rule without `from` (or with an empty peer) admits every source
        assert rule.get("from") and rule.get("ports"), rule
        assert all(p.get("protocol", "TCP") == "TCP" and p["port"] in ports and "endPort" not in p
                   for p in rule["ports"]), rule["ports"]
        for peer in rule["from"]:
            assert set(peer) == {"namespaceSelector", "podSelector"}, f"not only the Ray pods: {peer}"
            assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": kuberay_ns}}, peer
            assert peer["podSelector"] == {"matchLabels": KUBERAY_NODE_LABEL}, peer
    # the Ray pods' MLflow credentials (MLflow basic auth), if any: from a Secret, never a literal or in the URI
    for f, spec in _cluster_specs():
        for pod in _pod_specs(spec):
            for c in pod["containers"]:
                for e in c.get("env", []):
                    if e["name"] in MLFLOW_CREDENTIALS:
                        assert "secretKeyRef" in e.get("valueFrom", {}) and "value" not in e, f"{f}: {e}"
    for _, cm in _kind("ConfigMap"):
        assert not set(cm["data"]) & set(MLFLOW_CREDENTIALS), cm["data"]
        assert "@" not in cm["data"]["MLFLOW_TRACKING_URI"], "credentials in the tracking URI"


# -- environment variables and secrets ---------------------------------------------------------------------------------

# Names the manifests may set or use although raydecode/ does not read them: read by the named module of an
# installed package (checked below), so a misspelt name fails.
ENV_READ_ELSEWHERE = {
    "RAY_AUTH_MODE": "ray/_private/authentication/authentication_token_setup.py",
    "RAY_HEAD_IP": "ray/autoscaler/_private/util.py",            # set by the launcher for worker start commands
    "MLFLOW_TRACKING_URI": "mlflow/environment_variables.py",
    "MLFLOW_BACKEND_STORE_URI": "mlflow/cli/__init__.py",         # mlflow server --backend-store-uri
}


def _env_names_in(node, out: set[str]) -> None:
    if isinstance(node, dict):
        for item in _as_list(node.get("env", [])):
            if isinstance(item, dict) and "name" in item:
                out.add(item["name"])
        for v in node.values():
            _env_names_in(v, out)
    elif isinstance(node, list):
        for v in node:
            _env_names_in(v, out)
    elif isinstance(node, str):
        out.update(re.findall(r"\$\(([A-Z][A-Z0-9_]*)\)", node))                    # Kubernetes $(VAR)
        out.update(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", node))                     # shell $VAR / ${VAR}
        out.update(re.findall(r"(?:^|[\s'\"])([A-Z][A-Z0-9_]*)=", node))           # VAR=value, export VAR=value


def _manifest_env_names() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path, docs in [(LAUNCHER, [_launcher()]), *((ROOT / f, d) for f, d in _kuberay().items()),
                       (MLFLOW / "k8s.yaml", _mlflow_k8s())]:
        names: set[str] = set()
        for d in docs:
            _env_names_in(d, names)
            if d.get("kind") == "ConfigMap":
                names.update(d["data"])
            if d.get("kind") == "RayJob":  # runtime_env env_vars: names and values
                env_vars = yaml.safe_load(d["spec"]["runtimeEnvYAML"]).get("env_vars", {})
                names.update(env_vars)
                _env_names_in(list(env_vars.values()), names)
        found[str(path.relative_to(ROOT))] = names
    for path in (MLFLOW / "mlflow.service", MLFLOW / "mlflow.env.example"):
        text = "\n".join(ln for ln in path.read_text().splitlines() if not ln.lstrip().startswith("#"))
        names = set(re.findall(r"\$\{?([A-Z][A-Z0-9_]*)", text)) | set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
        found[str(path.relative_to(ROOT))] = names
    return found


def test_environment_variables_in_manifests_are_ones_something_reads():
    code = "\n".join(p.read_text() for p in (ROOT / "raydecode").rglob("*.py"))
    found = _manifest_env_names()
    assert {"MLFLOW_TRACKING_URI", "AWS_REGION", "RAY_AUTH_MODE"} <= set().union(*found.values()), found
    for name, module in ENV_READ_ELSEWHERE.items():
        top = Path(importlib.util.find_spec(module.split("/")[0]).origin).parent
        assert name in (top.parent / module).read_text(), f"{module} no longer mentions {name}"
    for path, names in found.items():
        for name in sorted(names):
            assert re.search(rf"\b{name}\b", code) or name in ENV_READ_ELSEWHERE, \
                f"{path}: {name} is read neither by raydecode/ nor by the allow-listed packages"


SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(r"aws_secret_access_key\s*[=:]\s*[\"']?[A-Za-z0-9/+=]{40}", re.I),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "Ray auth disabled": re.compile(r"RAY_AUTH_MODE[\"']?\s*[=:]\s*[\"']?disabled", re.I),
}


def test_no_credentials_and_no_disabled_ray_auth_in_deployment_files():
    fake_key = "AKIA" + "ABCDEFGHIJKLMNOP"
    fake_secret = "aws_secret_access_key = " + "a" * 40
    assert SECRET_PATTERNS["AWS access key id"].search(fake_key)
    assert SECRET_PATTERNS["AWS secret access key"].search(fake_secret)
    assert SECRET_PATTERNS["Ray auth disabled"].search("env: {RAY_AUTH_MODE: disabled}")
    files = [p for base in (CLUSTER, ROOT / "infra") for p in base.rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        text = path.read_text(errors="replace")
        for what, pattern in SECRET_PATTERNS.items():
            assert not pattern.search(text), f"{path.relative_to(ROOT)}: {what}"
        if path.suffix in (".yaml", ".yml"):
            kinds = [d.get("kind") for d in yaml.safe_load_all(text) if isinstance(d, dict)]
            assert "Secret" not in kinds, f"{path.relative_to(ROOT)}: a Secret manifest"


# -- raydecode submit: what it sends (the jobs themselves run in tests/test_cluster.py) ---------------------------


def test_submit_sends_only_the_environment_the_user_names_and_never_a_secret(monkeypatch, tmp_path):
    from raydecode.app.submit import EXCLUDES, Cluster, job_env, runtime_env
    from raydecode.errors import ConfigError

    remote, local = Cluster("http://ray-head.lab.internal:8265"), Cluster("http://127.0.0.1:8265")
    local._here = True  # a cluster on this machine (tests/test_cluster.py submits to one; the nodes' IPs decide)
    tunnel = Cluster("http://127.0.0.1:8265")  # `ray dashboard` / kubectl port-forward to a remote head
    tunnel._here = False
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab.internal:5000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a" * 40)
    # nothing travels unasked: the laptop's MLFLOW_TRACKING_URI is often a port-forward the cluster cannot reach
    env = runtime_env(ROOT)
    assert env["working_dir"] == str(ROOT) and ".venv/" in env["excludes"] and env["excludes"] == EXCLUDES
    assert env["env_vars"] == {}
    assert job_env(["MLFLOW_TRACKING_URI", "AWS_REGION=eu-west-1"], remote) == {
        "MLFLOW_TRACKING_URI": "http://mlflow.lab.internal:5000", "AWS_REGION": "eu-west-1"}
    # a loopback endpoint is fine for a cluster on this machine, refused (one line) for a remote one
    assert job_env(["AWS_ENDPOINT_URL_S3"], local) == {"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000"}
    with pytest.raises(ConfigError, match=re.escape("the cluster at http://127.0.0.1:8265 runs elsewhere")):
        job_env(["AWS_ENDPOINT_URL_S3"], tunnel)
    for names, words in [
        (["AWS_ENDPOINT_URL_S3"], "--env AWS_ENDPOINT_URL_S3=http://127.0.0.1:9000 points at this machine (127.0.0.1); "
                                  "the cluster at http://ray-head.lab.internal:8265 runs elsewhere"),
        (["MLFLOW_TRACKING_URI=http://localhost:5000"], "points at this machine (localhost)"),
        (["AWS_SECRET_ACCESS_KEY"], "--env AWS_SECRET_ACCESS_KEY: looks like a credential"),
        (["HF_TOKEN=hf_x"], "--env HF_TOKEN: looks like a credential"),
        (["MLFLOW_TRACKING_URI=https://user:hunter2@mlflow.lab.internal"], "a URL with a password"),
        (["NOT_SET_ANYWHERE"], "--env NOT_SET_ANYWHERE: not set in this environment"),
        (["1BAD"], "expected KEY or KEY=VALUE"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)) as err:
            job_env(names, remote)
        assert "\n" not in str(err.value) and "hunter2" not in str(err.value) and "a" * 40 not in str(err.value)
    # Ray expands the placeholder to the unpacked working_dir on each node and pip-installs it there
    assert env["pip"]["packages"] == ["${RAY_RUNTIME_ENV_CREATE_WORKING_DIR}"]
    assert "--no-build-isolation" in env["pip"]["pip_install_options"]
    assert "pip" not in runtime_env(ROOT, install=False)
    # Ray caches a pip environment by its spec: the spec follows pyproject.toml, not the code (which is the
    # working_dir's, first on the path)
    other = tmp_path / "checkout"
    other.mkdir()
    (other / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text())
    (other / "extra.py").write_text("x = 1\n")
    assert runtime_env(other)["pip"] == env["pip"]
    (other / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + "\n# a new pin\n")
    assert runtime_env(other)["pip"] != env["pip"]


def test_submit_checks_the_stage_and_config_before_uploading(tmp_path, monkeypatch):
    from raydecode.app.submit import Cluster, entrypoint
    from raydecode.errors import ConfigError

    assert entrypoint(["compare"], str(JOBS / "evaluate.yaml"), [], ROOT).endswith("--config jobs/evaluate.yaml")
    cmd = entrypoint(["pretrain"], str(JOBS / "pretrain-nsd.yaml"), ["optim.epochs=3"], ROOT)
    assert shlex.split(cmd) == ["raydecode", "pretrain", "--config", "jobs/pretrain-nsd.yaml", "--set",
                                "optim.epochs=3"]
    outside = tmp_path / "p.yaml"
    outside.write_text((JOBS / "pretrain.yaml").read_text())
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", os.environ["AWS_SECRET_ACCESS_KEY"])  # load_config exports the key
    for stage, config, sets, words in [
        (["pretrian"], None, [], "stage 'pretrian': allowed values"),
        (["pretrain"], str(outside), [], "outside the working directory"),
        (["pretrain"], str(JOBS / "missing.yaml"), [], "missing.yaml does not exist"),
        (["pretrain"], str(JOBS / "pretrain-nsd.yaml"), ["optim.epochz=3"], "epochz"),
        (["pretrain"], str(JOBS / "pretrain.yaml"), ["tracking_uri=http://127.0.0.1:5000"],
         "tracking_uri=http://127.0.0.1:5000 points at this machine"),
        (["info"], None, ["s3.endpoint_url=http://localhost:9000"], "s3.endpoint_url=http://localhost:9000 points at"),
        (["pretrain"], str(JOBS / "pretrain.yaml"), ["s3.secret_access_key=" + "k" * 40],
         "s3.secret_access_key is set in the config: a submitted job's config and command line are readable"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            entrypoint(stage, config, sets, ROOT, Cluster("http://ray-head.lab.internal:8265"))

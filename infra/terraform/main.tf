# raydecode on AWS: four private buckets, the identities that reach them, and the network boundary of
# the cluster-launcher cluster.
#
#   buckets          lab-nsd (store), lab-nsd-checkpoints (Ray Train/Tune storage), lab-nsd-mlflow (MLflow artifacts),
#                    lab-nsd-code (the RayJobs' working_dir zips): versioned, public access blocked, SSE-S3, TLS only
#   Ray nodes        EC2 roles + instance profiles for cluster/aws-gpu.yaml (head: also the autoscaler's EC2 calls)
#                    and an IRSA role for the KubeRay pods' service account (cluster/kuberay/01-serviceaccount.yaml)
#   code publisher   a policy for CI / maintainers (attached by you, to no Ray role): uploads the code zips
#   MLflow server    an EC2 role + instance profile (systemd host) and an IRSA role (infra/mlflow/k8s.yaml)
#   security groups  Ray nodes: all traffic between members, SSH from admin_cidr only (the dashboard and job API are
#                    reached through `ray dashboard`'s SSH tunnel); MLflow: port 5000 from the Ray nodes only
#
# S3 access is least privilege: s3:ListBucket on the buckets and s3:GetObject/PutObject/DeleteObject on their
# objects, nothing else. The Ray nodes get the store and checkpoint buckets; the MLflow server alone gets the
# artifact bucket (clients upload artifacts through the server: `mlflow server --serve-artifacts`). The code
# bucket is read-only to the Ray nodes: a job that could write it could replace the code every later job runs.

provider "aws" {
  region = var.region

  default_tags {
    tags = var.tags
  }
}

data "aws_caller_identity" "current" {}

data "aws_partition" "current" {}

locals {
  buckets = {
    data        = var.data_bucket
    checkpoints = var.checkpoint_bucket
    mlflow      = var.mlflow_bucket
    code        = var.code_bucket
  }

  irsa        = var.eks_oidc_provider_arn != ""
  oidc_issuer = local.irsa ? element(split("oidc-provider/", var.eks_oidc_provider_arn), 1) : ""
  irsa_subjects = {
    ray    = "system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"
    mlflow = "system:serviceaccount:${var.mlflow_k8s_namespace}:${var.mlflow_k8s_service_account}"
  }

  with_vpc     = var.vpc_id != ""
  ec2_arn      = "arn:${data.aws_partition.current.partition}:ec2:${var.region}:${data.aws_caller_identity.current.account_id}"
  instance_arn = "${local.ec2_arn}:instance/*"

  # Every identity that runs Ray code: none of them may write the code bucket (its bucket policy denies it even if
  # a broader policy is attached to one of them later).
  ray_role_arns = concat([aws_iam_role.ray_head.arn, aws_iam_role.ray_worker.arn], aws_iam_role.ray_irsa[*].arn)
}

# -- buckets -------------------------------------------------------------------------------------------------------

resource "aws_s3_bucket" "this" {
  for_each = local.buckets

  bucket        = each.value
  force_destroy = var.force_destroy
}

resource "aws_s3_bucket_ownership_controls" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    object_ownership = "BucketOwnerEnforced"
  }
}

resource "aws_s3_bucket_public_access_block" "this" {
  for_each = aws_s3_bucket.this

  bucket                  = each.value.id
  block_public_acls       = true
  block_public_policy     = true
  ignore_public_acls      = true
  restrict_public_buckets = true
}

resource "aws_s3_bucket_versioning" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  versioning_configuration {
    status = "Enabled"
  }
}

resource "aws_s3_bucket_server_side_encryption_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    apply_server_side_encryption_by_default {
      sse_algorithm = "AES256"
    }
  }
}

# Versioning keeps every overwritten shard and every rotated-out checkpoint: expire old versions, and the parts of
# multipart uploads that a killed writer never completed.
resource "aws_s3_bucket_lifecycle_configuration" "this" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  rule {
    id     = "expire-noncurrent-versions-and-incomplete-uploads"
    status = "Enabled"
    filter {}
    noncurrent_version_expiration {
      noncurrent_days = var.noncurrent_version_days
    }
    abort_incomplete_multipart_upload {
      days_after_initiation = 7
    }
  }

  depends_on = [aws_s3_bucket_versioning.this]
}

data "aws_iam_policy_document" "tls_only" {
  for_each = aws_s3_bucket.this

  statement {
    sid       = "DenyInsecureTransport"
    effect    = "Deny"
    actions   = ["s3:*"]
    resources = [each.value.arn, "${each.value.arn}/*"]
    principals {
      type        = "*"
      identifiers = ["*"]
    }
    condition {
      test     = "Bool"
      variable = "aws:SecureTransport"
      values   = ["false"]
    }
  }

  # The code bucket only: the Ray roles never write or delete the code that jobs run, whatever policy they are
  # given later (an explicit Deny wins over any Allow).
  dynamic "statement" {
    for_each = each.key == "code" ? [each.key] : []

    content {
      sid       = "DenyRayRolesWritingCode"
      effect    = "Deny"
      actions   = ["s3:PutObject*", "s3:DeleteObject*"]
      resources = ["${each.value.arn}/*"]
      principals {
        type        = "*"
        identifiers = ["*"]
      }
      condition {
        test     = "ArnEquals"
        variable = "aws:PrincipalArn"
        values   = local.ray_role_arns
      }
    }
  }
}

resource "aws_s3_bucket_policy" "tls_only" {
  for_each = aws_s3_bucket.this

  bucket = each.value.id
  policy = data.aws_iam_policy_document.tls_only[each.key].json

  depends_on = [aws_s3_bucket_public_access_block.this]
}

# -- S3 policies (least privilege) ---------------------------------------------------------------------------------

data "aws_iam_policy_document" "ray_s3" {
  statement {
    sid       = "ListStoreCheckpointAndCodeBuckets"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["data"].arn, aws_s3_bucket.this["checkpoints"].arn, aws_s3_bucket.this["code"].arn]
  }

  statement {
    sid       = "ReadWriteStoreAndCheckpointObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.this["data"].arn}/*", "${aws_s3_bucket.this["checkpoints"].arn}/*"]
  }

  # The RayJobs' runtime_env working_dir: read, never written (the zips are published with code_publisher).
  statement {
    sid       = "ReadCodeObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject"]
    resources = ["${aws_s3_bucket.this["code"].arn}/*"]
  }
}

# For the CI job or maintainer that publishes a release's zip (cluster/README.md): list, upload and read back in the
# code bucket. No delete: a published version stays (Ray caches a working_dir by its URI, so every release gets a
# new name), and versioning keeps what an upload replaced.
data "aws_iam_policy_document" "code_publisher" {
  statement {
    sid       = "ListCodeBucket"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["code"].arn]
  }

  statement {
    sid       = "PublishCodeObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject"]
    resources = ["${aws_s3_bucket.this["code"].arn}/*"]
  }
}

data "aws_iam_policy_document" "mlflow_s3" {
  statement {
    sid       = "ListArtifactBucket"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["mlflow"].arn]
  }

  statement {
    sid       = "ReadWriteArtifactObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.this["mlflow"].arn}/*"]
  }
}

# Also reads the code bucket. The description stays as it was: changing it (ForceNew) would replace the attached policy.
resource "aws_iam_policy" "ray_s3" {
  name        = "${var.name_prefix}-ray-s3"
  description = "Ray nodes: list, read, write and delete in the store and checkpoint buckets, nothing else"
  policy      = data.aws_iam_policy_document.ray_s3.json
}

# Not attached here: attach it to the CI role or the maintainers' group that publishes releases, never to a Ray role.
resource "aws_iam_policy" "code_publisher" {
  name        = "${var.name_prefix}-code-publisher"
  description = "CI / maintainers: upload the RayJobs' code zips to the code bucket; never for a Ray role"
  policy      = data.aws_iam_policy_document.code_publisher.json
}

resource "aws_iam_policy" "mlflow_s3" {
  name        = "${var.name_prefix}-mlflow-s3"
  description = "MLflow server: list, read, write and delete in the artifact bucket, nothing else"
  policy      = data.aws_iam_policy_document.mlflow_s3.json
}

# -- Ray nodes launched by `ray up cluster/aws-gpu.yaml` (EC2 trust) -----------------------------------------------

data "aws_iam_policy_document" "ec2_trust" {
  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_head" {
  name               = "${var.name_prefix}-ray-head"
  description        = "Ray head node (cluster/aws-gpu.yaml): S3 store and checkpoints, plus the autoscaler's EC2 calls"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role" "ray_worker" {
  name               = "${var.name_prefix}-ray-worker"
  description        = "Ray GPU worker nodes (cluster/aws-gpu.yaml): S3 store and checkpoints"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role_policy_attachment" "ray_head_s3" {
  role       = aws_iam_role.ray_head.name
  policy_arn = aws_iam_policy.ray_s3.arn
}

resource "aws_iam_role_policy_attachment" "ray_worker_s3" {
  role       = aws_iam_role.ray_worker.name
  policy_arn = aws_iam_policy.ray_s3.arn
}

# What the autoscaler on the head calls (ray/autoscaler/_private/aws/node_provider.py): launch workers with the
# worker instance profile, tag them, terminate them when idle (provider.cache_stopped_nodes: false, so no
# stop/start). Launching, tagging and terminating are limited to instances of this cluster. Only with vpc_id: the
# launcher's nodes need the Ray security group, and the launches are limited to its VPC.
#
# RunInstances is authorized on every resource a launch touches, one statement per kind so that each has its own
# limit: the instance only when the request tags it with this cluster's name (_create_node puts ray-cluster-name
# into TagSpecifications), subnets and network interfaces in the cluster's VPC, the Ray security group, images of
# gpu_ami_owners, the volumes the launch creates, and the launcher's default key pairs (ray-autoscaler_<region>,
# ray-autoscaler_<i>_<region>: config.py key_pair).
data "aws_iam_policy_document" "ray_autoscaler" {
  count = local.with_vpc ? 1 : 0

  statement {
    sid       = "DescribeForAutoscaler"
    effect    = "Allow"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages"]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchOnlyInstancesTaggedForThisCluster"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = [local.instance_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:RequestTag/ray-cluster-name"
      values   = [var.ray_cluster_name]
    }
  }

  statement {
    sid       = "LaunchIntoTheClusterVpc"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:subnet/*", "${local.ec2_arn}:network-interface/*"]
    condition {
      test     = "ArnEquals"
      variable = "ec2:Vpc"
      values   = ["${local.ec2_arn}:vpc/${var.vpc_id}"]
    }
  }

  statement {
    sid       = "LaunchWithTheRaySecurityGroup"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = [aws_security_group.ray[0].arn]
  }

  statement {
    sid       = "LaunchFromTheGpuAmiOwners"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["arn:${data.aws_partition.current.partition}:ec2:${var.region}::image/*"]
    condition {
      test     = "StringEquals"
      variable = "ec2:Owner"
      values   = var.gpu_ami_owners
    }
  }

  # RunInstances cannot attach an existing volume: these are the ones the launch creates (BlockDeviceMappings).
  statement {
    sid       = "LaunchWithNewVolumesAndTheLauncherKeyPair"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["${local.ec2_arn}:volume/*", "${local.ec2_arn}:key-pair/ray-autoscaler_*"]
  }

  statement {
    sid       = "TagWorkersAtLaunch"
    effect    = "Allow"
    actions   = ["ec2:CreateTags"]
    resources = [local.instance_arn]
    condition {
      test     = "StringEquals"
      variable = "ec2:CreateAction"
      values   = ["RunInstances"]
    }
  }

  statement {
    sid       = "TagAndTerminateOwnWorkers"
    effect    = "Allow"
    actions   = ["ec2:CreateTags", "ec2:TerminateInstances"]
    resources = [local.instance_arn]
    condition {
      test     = "StringEquals"
      variable = "aws:ResourceTag/ray-cluster-name"
      values   = [var.ray_cluster_name]
    }
  }

  statement {
    sid       = "PassWorkerRole"
    effect    = "Allow"
    actions   = ["iam:PassRole"]
    resources = [aws_iam_role.ray_worker.arn]
    condition {
      test     = "StringEquals"
      variable = "iam:PassedToService"
      values   = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role_policy" "ray_head_autoscaler" {
  count = local.with_vpc ? 1 : 0

  name   = "${var.name_prefix}-ray-autoscaler"
  role   = aws_iam_role.ray_head.id
  policy = data.aws_iam_policy_document.ray_autoscaler[0].json
}

resource "aws_iam_instance_profile" "ray_head" {
  name = "${var.name_prefix}-ray-head"
  role = aws_iam_role.ray_head.name
}

resource "aws_iam_instance_profile" "ray_worker" {
  name = "${var.name_prefix}-ray-worker"
  role = aws_iam_role.ray_worker.name
}

# -- IRSA: the same S3 access for pods on EKS (KubeRay), by service account ----------------------------------------

data "aws_iam_policy_document" "irsa_trust" {
  for_each = { for who, subject in local.irsa_subjects : who => subject if local.irsa }

  statement {
    effect  = "Allow"
    actions = ["sts:AssumeRoleWithWebIdentity"]
    principals {
      type        = "Federated"
      identifiers = [var.eks_oidc_provider_arn]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:sub"
      values   = [each.value]
    }
    condition {
      test     = "StringEquals"
      variable = "${local.oidc_issuer}:aud"
      values   = ["sts.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "ray_irsa" {
  count = local.irsa ? 1 : 0

  name               = "${var.name_prefix}-ray-irsa"
  description        = "KubeRay pods (service account ${var.k8s_namespace}/${var.k8s_service_account}): S3 store and checkpoints"
  assume_role_policy = data.aws_iam_policy_document.irsa_trust["ray"].json
}

resource "aws_iam_role_policy_attachment" "ray_irsa_s3" {
  count = local.irsa ? 1 : 0

  role       = aws_iam_role.ray_irsa[0].name
  policy_arn = aws_iam_policy.ray_s3.arn
}

# -- MLflow server: EC2 host (systemd unit) or pod (IRSA) ----------------------------------------------------------

resource "aws_iam_role" "mlflow" {
  name               = "${var.name_prefix}-mlflow"
  description        = "MLflow tracking server on EC2 (infra/mlflow/mlflow.service): the artifact bucket"
  assume_role_policy = data.aws_iam_policy_document.ec2_trust.json
}

resource "aws_iam_role_policy_attachment" "mlflow_s3" {
  role       = aws_iam_role.mlflow.name
  policy_arn = aws_iam_policy.mlflow_s3.arn
}

resource "aws_iam_instance_profile" "mlflow" {
  name = "${var.name_prefix}-mlflow"
  role = aws_iam_role.mlflow.name
}

resource "aws_iam_role" "mlflow_irsa" {
  count = local.irsa ? 1 : 0

  name               = "${var.name_prefix}-mlflow-irsa"
  description        = "MLflow tracking server pod (service account ${var.mlflow_k8s_namespace}/${var.mlflow_k8s_service_account}): the artifact bucket"
  assume_role_policy = data.aws_iam_policy_document.irsa_trust["mlflow"].json
}

resource "aws_iam_role_policy_attachment" "mlflow_irsa_s3" {
  count = local.irsa ? 1 : 0

  role       = aws_iam_role.mlflow_irsa[0].name
  policy_arn = aws_iam_policy.mlflow_s3.arn
}

# -- security groups of the cluster-launcher cluster (only with vpc_id) --------------------------------------------
# cluster/aws-gpu.yaml names the Ray group in every node type's SecurityGroupIds, so the launcher does not create
# its default group (which would open SSH to 0.0.0.0/0). Nothing but SSH from admin_cidr reaches the nodes from
# outside: the dashboard (8265), the job API and the client port are reached through `ray dashboard`'s tunnel.

resource "aws_security_group" "ray" {
  count = local.with_vpc ? 1 : 0

  name        = "${var.name_prefix}-ray"
  description = "Ray nodes: all traffic between members, SSH from the admin CIDR only"
  vpc_id      = var.vpc_id

  lifecycle {
    precondition {
      condition     = var.admin_cidr != ""
      error_message = "Set admin_cidr (the network you run `ray up` / `ray dashboard` from) together with vpc_id."
    }
  }
}

resource "aws_vpc_security_group_ingress_rule" "ray_members" {
  count = local.with_vpc ? 1 : 0

  security_group_id            = aws_security_group.ray[0].id
  description                  = "Ray nodes talk to each other on any port (GCS, raylets, object manager, NCCL)"
  ip_protocol                  = "-1"
  referenced_security_group_id = aws_security_group.ray[0].id
}

resource "aws_vpc_security_group_ingress_rule" "ray_ssh_admin" {
  count = local.with_vpc ? 1 : 0

  security_group_id = aws_security_group.ray[0].id
  description       = "SSH from the admin network: ray up, ray attach, ray dashboard port-forwarding"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_egress_rule" "ray_out" {
  count = local.with_vpc ? 1 : 0

  security_group_id = aws_security_group.ray[0].id
  description       = "S3, package registries, the MLflow server"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_security_group" "mlflow" {
  count = local.with_vpc ? 1 : 0

  name        = "${var.name_prefix}-mlflow"
  description = "MLflow tracking server: port 5000 from the Ray nodes, SSH from the admin CIDR"
  vpc_id      = var.vpc_id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_from_ray" {
  count = local.with_vpc ? 1 : 0

  security_group_id            = aws_security_group.mlflow[0].id
  description                  = "MLflow REST API and artifact proxy for the Ray nodes"
  ip_protocol                  = "tcp"
  from_port                    = 5000
  to_port                      = 5000
  referenced_security_group_id = aws_security_group.ray[0].id
}

resource "aws_vpc_security_group_ingress_rule" "mlflow_ssh_admin" {
  count = local.with_vpc ? 1 : 0

  security_group_id = aws_security_group.mlflow[0].id
  description       = "SSH from the admin network (also to tunnel the MLflow UI)"
  ip_protocol       = "tcp"
  from_port         = 22
  to_port           = 22
  cidr_ipv4         = var.admin_cidr
}

resource "aws_vpc_security_group_egress_rule" "mlflow_out" {
  count = local.with_vpc ? 1 : 0

  security_group_id = aws_security_group.mlflow[0].id
  description       = "S3 and the PostgreSQL backend store"
  ip_protocol       = "-1"
  cidr_ipv4         = "0.0.0.0/0"
}

# -- the AMI of cluster/aws-gpu.yaml -------------------------------------------------------------------------------

data "aws_ami" "gpu" {
  count = var.gpu_ami_name_filter != "" ? 1 : 0

  most_recent = true
  owners      = var.gpu_ami_owners

  filter {
    name   = "name"
    values = [var.gpu_ami_name_filter]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

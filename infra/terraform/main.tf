# raydecode on AWS: three private buckets, the identities that reach them, and the network boundary of
# the cluster-launcher cluster.
#
#   buckets          lab-nsd (store), lab-nsd-checkpoints (Ray Train/Tune storage), lab-nsd-mlflow (MLflow artifacts):
#                    versioned, public access blocked, SSE-S3, TLS only
#   Ray nodes        EC2 roles + instance profiles for cluster/aws-gpu.yaml (head: also the autoscaler's EC2 calls)
#                    and an IRSA role for the KubeRay pods' service account (cluster/kuberay/01-serviceaccount.yaml)
#   MLflow server    an EC2 role + instance profile (systemd host) and an IRSA role (infra/mlflow/k8s.yaml)
#   security groups  Ray nodes: all traffic between members, SSH from admin_cidr only (the dashboard and job API are
#                    reached through `ray dashboard`'s SSH tunnel); MLflow: port 5000 from the Ray nodes only
#
# S3 access is least privilege: s3:ListBucket on the buckets and s3:GetObject/PutObject/DeleteObject on their
# objects, nothing else. The Ray nodes get the store and checkpoint buckets; the MLflow server alone gets the
# artifact bucket (clients upload artifacts through the server: `mlflow server --serve-artifacts`).

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
  }

  irsa        = var.eks_oidc_provider_arn != ""
  oidc_issuer = local.irsa ? element(split("oidc-provider/", var.eks_oidc_provider_arn), 1) : ""
  irsa_subjects = {
    ray    = "system:serviceaccount:${var.k8s_namespace}:${var.k8s_service_account}"
    mlflow = "system:serviceaccount:${var.mlflow_k8s_namespace}:${var.mlflow_k8s_service_account}"
  }

  with_vpc     = var.vpc_id != ""
  instance_arn = "arn:${data.aws_partition.current.partition}:ec2:${var.region}:${data.aws_caller_identity.current.account_id}:instance/*"
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
    sid       = "ListStoreAndCheckpointBuckets"
    effect    = "Allow"
    actions   = ["s3:ListBucket"]
    resources = [aws_s3_bucket.this["data"].arn, aws_s3_bucket.this["checkpoints"].arn]
  }

  statement {
    sid       = "ReadWriteStoreAndCheckpointObjects"
    effect    = "Allow"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["${aws_s3_bucket.this["data"].arn}/*", "${aws_s3_bucket.this["checkpoints"].arn}/*"]
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

resource "aws_iam_policy" "ray_s3" {
  name        = "${var.name_prefix}-ray-s3"
  description = "Ray nodes: list, read, write and delete in the store and checkpoint buckets, nothing else"
  policy      = data.aws_iam_policy_document.ray_s3.json
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
# stop/start). Tagging and terminating are limited to instances of this cluster.
data "aws_iam_policy_document" "ray_autoscaler" {
  statement {
    sid       = "DescribeForAutoscaler"
    effect    = "Allow"
    actions   = ["ec2:DescribeInstances", "ec2:DescribeInstanceTypes", "ec2:DescribeImages"]
    resources = ["*"]
  }

  statement {
    sid       = "LaunchWorkers"
    effect    = "Allow"
    actions   = ["ec2:RunInstances"]
    resources = ["*"]
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
  name   = "${var.name_prefix}-ray-autoscaler"
  role   = aws_iam_role.ray_head.id
  policy = data.aws_iam_policy_document.ray_autoscaler.json
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
  owners      = ["amazon"]

  filter {
    name   = "name"
    values = [var.gpu_ami_name_filter]
  }

  filter {
    name   = "architecture"
    values = ["x86_64"]
  }
}

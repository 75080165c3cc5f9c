# Defaults match jobs/*-nsd.yaml, cluster/aws-gpu.yaml, cluster/kuberay/ and infra/mlflow/
# (tests/test_cluster_files.py checks that they agree).

variable "region" {
  description = "AWS region of the buckets and the Ray nodes (cluster/aws-gpu.yaml provider.region, AWS_REGION in cluster/kuberay/02-configmap.yaml)."
  type        = string
  default     = "us-east-1"
}

variable "name_prefix" {
  description = "Prefix of the IAM roles, instance profiles, policies and security groups."
  type        = string
  default     = "raydecode"
}

variable "data_bucket" {
  description = "The NSD store and its derived data (jobs/*-nsd.yaml `store: s3://lab-nsd/nsd-store`)."
  type        = string
  default     = "lab-nsd"
}

variable "checkpoint_bucket" {
  description = "Ray Train / Tune storage: checkpoints and final models (jobs/*-nsd.yaml `checkpoint.storage_path`, `init_from`)."
  type        = string
  default     = "lab-nsd-checkpoints"
}

variable "mlflow_bucket" {
  description = "MLflow artifact store (infra/mlflow: `--artifacts-destination s3://lab-nsd-mlflow/artifacts`)."
  type        = string
  default     = "lab-nsd-mlflow"
}

variable "code_bucket" {
  description = "The RayJobs' working_dir zips (cluster/kuberay/jobs/rayjob-*.yaml `working_dir: s3://lab-nsd-code/raydecode-<version>.zip`): read-only to the Ray roles, written with the code_publisher policy."
  type        = string
  default     = "lab-nsd-code"
}

variable "force_destroy" {
  description = "Allow `terraform destroy` to delete non-empty buckets. Leave false for real data."
  type        = bool
  default     = false
}

variable "noncurrent_version_days" {
  description = "Days a replaced or deleted object version is kept (versioning is on for every bucket)."
  type        = number
  default     = 30
}

variable "ray_cluster_name" {
  description = "cluster_name in cluster/aws-gpu.yaml: the head's autoscaler may only tag and terminate instances carrying this ray-cluster-name tag."
  type        = string
  default     = "raydecode-gpu"
}

variable "eks_oidc_provider_arn" {
  description = "ARN of the EKS cluster's IAM OIDC provider (arn:aws:iam::<account>:oidc-provider/oidc.eks.<region>.amazonaws.com/id/<id>). Empty: no IRSA roles."
  type        = string
  default     = ""
}

variable "k8s_namespace" {
  description = "Namespace of the KubeRay clusters and jobs (cluster/kuberay/00-namespace.yaml)."
  type        = string
  default     = "raydecode"
}

variable "k8s_service_account" {
  description = "Service account of the Ray pods (cluster/kuberay/01-serviceaccount.yaml); the IRSA role trusts exactly this one."
  type        = string
  default     = "raydecode-ray"
}

variable "mlflow_k8s_namespace" {
  description = "Namespace of the MLflow server on Kubernetes (infra/mlflow/k8s.yaml). Its Service `mlflow` in namespace `internal` is `mlflow.internal` inside the cluster."
  type        = string
  default     = "internal"
}

variable "mlflow_k8s_service_account" {
  description = "Service account of the MLflow server pod (infra/mlflow/k8s.yaml)."
  type        = string
  default     = "mlflow"
}

variable "vpc_id" {
  description = "VPC of the Ray nodes launched with cluster/aws-gpu.yaml. Empty: no security groups are created (e.g. a KubeRay-only setup)."
  type        = string
  default     = ""
}

variable "admin_cidr" {
  description = "The only source allowed to SSH to the Ray head (and the MLflow host): `ray up`, `ray dashboard` and `ray attach` go through SSH. Required with vpc_id; never 0.0.0.0/0."
  type        = string
  default     = ""

  validation {
    condition     = var.admin_cidr == "" || (can(cidrnetmask(var.admin_cidr)) && !startswith(var.admin_cidr, "0.0.0.0/"))
    error_message = "admin_cidr must be an IPv4 CIDR of your admin network (e.g. 203.0.113.7/32), not 0.0.0.0/0."
  }
}

variable "gpu_ami_name_filter" {
  description = "Name filter of the AMI for cluster/aws-gpu.yaml (NVIDIA driver + Docker + NVIDIA container toolkit; Amazon-owned). Empty: no lookup."
  type        = string
  default     = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *"
}

variable "gpu_ami_owners" {
  description = "Owners of the AMI for cluster/aws-gpu.yaml: the gpu_ami lookup searches only these, and the head's autoscaler may launch only their images (ec2:Owner). Add your account id for an AMI of your own."
  type        = list(string)
  default     = ["amazon"]
}

variable "tags" {
  description = "Tags on every resource."
  type        = map(string)
  default = {
    project = "raydecode"
  }
}

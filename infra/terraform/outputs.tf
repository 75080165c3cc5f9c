# What cluster/aws-gpu.yaml, cluster/kuberay/01-serviceaccount.yaml and infra/mlflow/ need (see cluster/README.md).

output "data_bucket" {
  description = "The store bucket: store: s3://<this>/nsd-store"
  value       = aws_s3_bucket.this["data"].bucket
}

output "checkpoint_bucket" {
  description = "Ray Train / Tune storage: checkpoint.storage_path: s3://<this>/runs"
  value       = aws_s3_bucket.this["checkpoints"].bucket
}

output "mlflow_bucket" {
  description = "MLflow artifacts: --artifacts-destination s3://<this>/artifacts"
  value       = aws_s3_bucket.this["mlflow"].bucket
}

output "code_bucket" {
  description = "The RayJobs' working_dir: s3://<this>/raydecode-<version>.zip (cluster/README.md)"
  value       = aws_s3_bucket.this["code"].bucket
}

output "code_publisher_policy_arn" {
  description = "Attach to the CI role / maintainers that upload the code zips (never to a Ray role)"
  value       = aws_iam_policy.code_publisher.arn
}

output "ray_head_instance_profile_arn" {
  description = "cluster/aws-gpu.yaml: the head node type's IamInstanceProfile.Arn"
  value       = aws_iam_instance_profile.ray_head.arn
}

output "ray_worker_instance_profile_arn" {
  description = "cluster/aws-gpu.yaml: the GPU worker node types' IamInstanceProfile.Arn"
  value       = aws_iam_instance_profile.ray_worker.arn
}

output "ray_head_role_arn" {
  value = aws_iam_role.ray_head.arn
}

output "ray_worker_role_arn" {
  value = aws_iam_role.ray_worker.arn
}

output "ray_irsa_role_arn" {
  description = "cluster/kuberay/01-serviceaccount.yaml: eks.amazonaws.com/role-arn (null without eks_oidc_provider_arn)"
  value       = try(aws_iam_role.ray_irsa[0].arn, null)
}

output "mlflow_role_arn" {
  value = aws_iam_role.mlflow.arn
}

output "mlflow_instance_profile_arn" {
  description = "The EC2 host running infra/mlflow/mlflow.service"
  value       = aws_iam_instance_profile.mlflow.arn
}

output "mlflow_irsa_role_arn" {
  description = "infra/mlflow/k8s.yaml: the mlflow service account's eks.amazonaws.com/role-arn (null without eks_oidc_provider_arn)"
  value       = try(aws_iam_role.mlflow_irsa[0].arn, null)
}

output "ray_security_group_id" {
  description = "cluster/aws-gpu.yaml: every node type's SecurityGroupIds (null without vpc_id)"
  value       = try(aws_security_group.ray[0].id, null)
}

output "mlflow_security_group_id" {
  value = try(aws_security_group.mlflow[0].id, null)
}

output "gpu_ami_id" {
  description = "cluster/aws-gpu.yaml: every node type's ImageId"
  value       = try(data.aws_ami.gpu[0].id, null)
}

#!/usr/bin/env bash
# Start the cluster of infra/aws/cluster.yaml in REGION with the region's current Deep Learning
# AMI (Ubuntu 22.04, NVIDIA driver), looked up in AWS's public Parameter Store:
#   infra/aws/up.sh [REGION]        (default: the config's region)
# The filled-in config is written beside it as .cluster.resolved.yaml, and the cluster's token as
# .auth_token (both ignored by git); pass the config to the other `ray` cluster commands.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."   # file_mounts are relative to the repository root
# One token for the head, the workers and your clients (RAY_AUTH_TOKEN_PATH=infra/aws/.auth_token).
[ -s "$here/.auth_token" ] || (umask 077; python3 -c 'import secrets; print(secrets.token_hex(32))' > "$here/.auth_token")
region="${1:-$(sed -n 's/^  region: //p' "$here/cluster.yaml")}"
parameter=/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
ami="$(aws ssm get-parameter --region "$region" --name "$parameter" \
       --query Parameter.Value --output text)"
sed -e "s/ami-00000000000000000/$ami/" -e "s/^  region: .*/  region: $region/" \
    "$here/cluster.yaml" > "$here/.cluster.resolved.yaml"
echo "region $region, AMI $ami"
exec ray up --yes "$here/.cluster.resolved.yaml"

#!/usr/bin/env bash
# Create (optionally), set up and run on every worker of a Cloud TPU pod slice.
#   TPU=my-pod ZONE=us-central2-b TYPE=v4-128 launch/tpu_pod.sh create
#   TPU=my-pod ZONE=us-central2-b launch/tpu_pod.sh setup          # copy this repo, pip install on all workers
#   TPU=my-pod ZONE=us-central2-b launch/tpu_pod.sh run experiments/pretrain.py:size=xl gs://BUCKET/runs/xl \
#       --config.mesh.fsdp=16 --config.mesh.tensor=4
#   TPU=my-pod ZONE=us-central2-b launch/tpu_pod.sh delete
set -euo pipefail
: "${TPU:?set TPU to the pod name}" "${ZONE:?set ZONE}"
ssh_all() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
case "${1:?create|setup|run|delete}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU" --zone="$ZONE" --accelerator-type="${TYPE:?set TYPE, e.g. v4-128}" \
      --version="${RUNTIME:-tpu-ubuntu2204-base}" ;;
  setup)
    tar czf /tmp/instructgpt_jax.tgz --exclude=runs --exclude=.git -C "$(dirname "$0")/.." .
    gcloud compute tpus tpu-vm scp /tmp/instructgpt_jax.tgz "$TPU":~/ --zone="$ZONE" --worker=all
    ssh_all 'mkdir -p ~/instructgpt_jax && tar xzf ~/instructgpt_jax.tgz -C ~/instructgpt_jax &&
             pip install -q "jax[tpu]" -e ~/instructgpt_jax' ;;
  run)
    shift
    args=$(printf ' %q' "$@")
    ssh_all "cd ~/instructgpt_jax && launch/run_tpu.sh$args" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU" --zone="$ZONE" --quiet ;;
  *) echo "unknown command $1" >&2; exit 2 ;;
esac

#!/usr/bin/env bash
# Start one Prefect worker per GPU of this machine on the work pool of deployments/prefect.yaml.
#
#   deployments/start-workers.sh            # every GPU nvidia-smi lists (one CPU worker when there is none)
#   deployments/start-workers.sh 0 2        # only GPUs 0 and 2
#
# Worker i sees only GPU i (CUDA_VISIBLE_DEVICES=i) and runs one flow run at a time, so runs never
# share a GPU across workers; inside a run, num_gpus_per_worker bounds the tasks sharing it.
# PREFECT_API_URL must point at the server. Runs in the foreground; Ctrl-C (or TERM) stops all workers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
pool="$("$python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["definitions"]["work_pools"]["gpu_pool"]["name"])' "$here/prefect.yaml")"
host="$(hostname -s 2>/dev/null || hostname)"

if [ "$#" -gt 0 ]; then
    gpus=("$@")
elif command -v nvidia-smi >/dev/null 2>&1; then
    mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
    gpus=()
fi

pids=()
stop() {
    trap - TERM INT EXIT
    [ "${#pids[@]}" -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    wait || true
}
trap stop TERM INT EXIT

if [ "${#gpus[@]}" -eq 0 ]; then
    echo "no GPU found: starting one CPU worker on pool $pool" >&2
    CUDA_VISIBLE_DEVICES="" "$python" -m prefect worker start --pool "$pool" --name "$host-cpu" --limit 1 &
    pids+=("$!")
else
    for gpu in "${gpus[@]}"; do
        echo "GPU $gpu: worker $host-gpu$gpu on pool $pool" >&2
        CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$gpu" \
            "$python" -m prefect worker start --pool "$pool" --name "$host-gpu$gpu" --limit 1 &
        pids+=("$!")
    done
fi
# A worker that exits (bad API URL, missing pool) stops the others, so the failure is not hidden.
wait -n "${pids[@]}"

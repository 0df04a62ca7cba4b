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
stopping=""
# One signal per worker stops it gracefully (a second one kills its flow runs): Ctrl-C reaches the
# workers from the terminal, `kill <this script>` is forwarded to them.
trap 'stopping=yes' INT
trap 'stopping=yes; kill -TERM "${pids[@]}" 2>/dev/null || true' TERM

if [ "${#gpus[@]}" -eq 0 ]; then
    echo "no GPU found: starting one CPU worker on pool $pool" >&2
    # (trap - INT: a background job of a script would otherwise ignore SIGINT, which Prefect's worker uses to stop)
    ( trap - INT; CUDA_VISIBLE_DEVICES="" exec "$python" -m prefect worker start --pool "$pool" --name "$host-cpu" --limit 1 ) &
    pids+=("$!")
else
    for gpu in "${gpus[@]}"; do
        echo "GPU $gpu: worker $host-gpu$gpu on pool $pool" >&2
        ( trap - INT; CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$gpu" \
            exec "$python" -m prefect worker start --pool "$pool" --name "$host-gpu$gpu" --limit 1 ) &
        pids+=("$!")
    done
fi

status=0
wait -n "${pids[@]}" || status=$?
if [ -z "$stopping" ]; then
    # A worker exited by itself (bad PREFECT_API_URL, missing pool): stop the others so it is not hidden.
    echo "a worker exited with status $status; stopping the others" >&2
    kill -TERM "${pids[@]}" 2>/dev/null || true
    status=$(( status == 0 ? 1 : status ))
fi
while [ -n "$(jobs -pr)" ]; do wait || true; done
exit "$status"

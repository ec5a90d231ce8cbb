#!/bin/sh
# Entry point of the comfys3 image. It only picks the worker's mode: the worker itself starts
# ComfyUI (from COMFYS3_COMFYUI_PATH), waits for it, and restarts it if it dies.
#   COMFYS3_MODE=runpod (default)  RunPod serverless handler: `comfys3 runpod`
#   COMFYS3_MODE=poll              poll the S3 intake prefix:  `comfys3 run`
# Arguments given to the container are passed on to the worker.
set -eu

COMFYS3_COMFYUI_PATH="${COMFYS3_COMFYUI_PATH:-/comfyui}"
export COMFYS3_COMFYUI_PATH
mode="${COMFYS3_MODE:-runpod}"

# The network volume (RunPod mounts it at /runpod-volume; COMFYS3_VOLUME_DIR names another)
# keeps what outlives a worker: logs/ (the worker writes them there itself) and huggingface/,
# the Hugging Face cache of the worker, ComfyUI and its custom nodes, shared by all workers.
volume="${COMFYS3_VOLUME_DIR:-/runpod-volume}"
if [ -n "${COMFYS3_VOLUME_DIR:-}" ] || [ -d "$volume" ]; then
    HF_HOME="${HF_HOME:-$volume/huggingface}"
    export HF_HOME
    mkdir -p "$volume/logs" "$HF_HOME"
fi

if [ ! -f "$COMFYS3_COMFYUI_PATH/main.py" ]; then
    echo "start.sh: no ComfyUI at COMFYS3_COMFYUI_PATH=$COMFYS3_COMFYUI_PATH (main.py missing)" >&2
    exit 66
fi

case "$mode" in
    runpod)
        exec comfys3 runpod "$@"
        ;;
    poll)
        exec comfys3 run "$@"
        ;;
    *)
        echo "start.sh: COMFYS3_MODE must be 'runpod' or 'poll', not '$mode'" >&2
        exit 64
        ;;
esac

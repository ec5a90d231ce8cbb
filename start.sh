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

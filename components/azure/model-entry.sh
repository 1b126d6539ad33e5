#!/bin/sh
# The model module's entry point: copy this image's bundle into the shared volume, then stay up.
#
# The runtime module reads bundles from the volume (mounted read-only) at Model.BundlePath, which is
# /models/<name>-<version>. The copy goes to a hidden folder first and is renamed into place only once
# complete and synced (a rename within one file system is atomic), so the runtime never sees half a
# bundle, even after a power cut. Versions already in the volume stay: the previous one is there for
# a roll-back. The module then waits, because IoT Edge restarts a module that exits
# (restartPolicy always) and reports it as failing.
set -eu

source_dir="${BUNDLE_SOURCE:-/opt/model/bundle}"
models="${MODELS_DIR:-/models}"
name="$(cat "${BUNDLE_NAME_FILE:-/opt/model/NAME}")"
case "$name" in
    "" | */* | .*)
        echo "model-entry: '$name' is not a bundle folder name" >&2
        exit 1
        ;;
esac
target="$models/$name"

# A clean exit on SIGTERM ("docker stop") from the start: a stop during the copy leaves only the
# hidden partial folder, which the next start removes.
sleeper=""
trap 'if [ -n "$sleeper" ]; then kill "$sleeper" 2>/dev/null || :; fi; exit 0' TERM INT

if [ -d "$target" ]; then
    echo "model-entry: $target is already in place"
else
    partial="$models/.$name.partial"
    rm -rf "$partial"
    cp -R "$source_dir" "$partial"
    sync
    mv "$partial" "$target"
    sync
    echo "model-entry: copied $name to $target"
fi

# Sleep in the background and wait for it: the shell runs its trap (a clean exit on SIGTERM from
# "docker stop") only between commands, and a foreground sleep would hold it off.
while :; do
    sleep 300 &
    sleeper=$!
    wait "$sleeper" || :
done

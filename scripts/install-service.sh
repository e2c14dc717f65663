#!/usr/bin/env bash
# Installs rnull as a host service:
#
#   $PREFIX/lib/rnull/               the built daemon (dist/, the native addon, bin/, and the
#                                    runtime node_modules it needs, copied from this checkout)
#   $PREFIX/bin/rnull                a wrapper running it with the node found now
#   $UNITDIR/rnull@.service          the template unit (ExecStart pointed at the wrapper)
#   $QEMUDATADIR/vhost-user/50-rnull.json
#                                    the vhost-user back-end descriptor (binary: the wrapper)
#   $SYSCONFDIR/rnull/example.json   an example per-VM configuration (kept if it exists)
#
# Usage: sudo ./scripts/install-service.sh      (after `npm ci && npm run build`)
#   then: cp /etc/rnull/example.json /etc/rnull/vm1.json && systemctl enable --now rnull@vm1
#
# Variables (for packaging or a trial install into a temporary directory):
#   DESTDIR      staging root prepended to every path written (default: none)
#   PREFIX       default /usr/local
#   SYSCONFDIR   default /etc
#   UNITDIR      default /etc/systemd/system
#   QEMUDATADIR  default /usr/share/qemu
#   NODE         the node binary the wrapper runs (default: `command -v node`)
# systemctl daemon-reload runs only for a real install (no DESTDIR, default UNITDIR, systemd up).
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR=${DESTDIR:-}
PREFIX=${PREFIX:-/usr/local}
SYSCONFDIR=${SYSCONFDIR:-/etc}
UNITDIR=${UNITDIR:-/etc/systemd/system}
QEMUDATADIR=${QEMUDATADIR:-/usr/share/qemu}
NODE=${NODE:-$(command -v node || true)}

die() { echo "install-service: $*" >&2; exit 1; }
[[ -n "$NODE" && -x "$NODE" ]] || die "node not found (set NODE=/path/to/node)"
[[ -f dist/daemon/main.js && -f build/Release/rnull_native.node ]] || die "not built: run npm ci && npm run build first"
case "$NODE" in
  /home/*|/root/*) echo "install-service: warning: $NODE is under a home directory, which the unit's ProtectHome=yes hides; install Node.js system-wide or set NODE" >&2 ;;
esac

LIBDIR="$PREFIX/lib/rnull"
BIN="$PREFIX/bin/rnull"

# The daemon and its runtime dependencies (package.json "dependencies", their dependencies,
# and pino-pretty when present), copied from this checkout's node_modules.
rm -rf "$DESTDIR$LIBDIR"
install -d "$DESTDIR$LIBDIR/build/Release" "$DESTDIR$LIBDIR/node_modules" "$DESTDIR$LIBDIR/bin"
cp -R dist "$DESTDIR$LIBDIR/dist"
install -m 0755 build/Release/rnull_native.node "$DESTDIR$LIBDIR/build/Release/"
install -m 0755 bin/rnull "$DESTDIR$LIBDIR/bin/rnull"
install -m 0644 package.json "$DESTDIR$LIBDIR/package.json"
"$NODE" -e '
  const fs = require("fs"), path = require("path");
  const want = [...Object.keys(require("./package.json").dependencies || {}), "pino-pretty"];
  const seen = new Set();
  const visit = (name, optional) => {
    if (seen.has(name)) return;
    const dir = path.join("node_modules", name);
    if (!fs.existsSync(path.join(dir, "package.json"))) {
      if (!optional) { console.error(`install-service: ${name} missing from node_modules (run npm ci)`); process.exit(1); }
      return;
    }
    seen.add(name);
    const p = require(path.resolve(dir, "package.json"));
    for (const d of Object.keys(p.dependencies || {})) visit(d, false);
    for (const d of Object.keys(p.optionalDependencies || {})) visit(d, true);
  };
  for (const n of want) visit(n, n === "pino-pretty" || n === "node-addon-api");
  console.log([...seen].join("\n"));
' | while read -r mod; do
  install -d "$DESTDIR$LIBDIR/node_modules/$(dirname "$mod")"
  cp -R "node_modules/$mod" "$DESTDIR$LIBDIR/node_modules/$mod"
done

install -d "$DESTDIR$PREFIX/bin"
cat > "$DESTDIR$BIN" <<WRAPPER
#!/bin/sh
# rnull, installed by scripts/install-service.sh
exec "$NODE" "$LIBDIR/bin/rnull" "\$@"
WRAPPER
chmod 0755 "$DESTDIR$BIN"

install -d "$DESTDIR$UNITDIR"
sed -e "s#/usr/local/bin/rnull#$BIN#g" -e "s#/etc/rnull/#$SYSCONFDIR/rnull/#g" systemd/rnull@.service > "$DESTDIR$UNITDIR/rnull@.service"
chmod 0644 "$DESTDIR$UNITDIR/rnull@.service"

install -d "$DESTDIR$QEMUDATADIR/vhost-user"
"$NODE" -e '
  const d = JSON.parse(require("fs").readFileSync("qemu/50-rnull.json", "utf8"));
  d.binary = process.argv[1];
  process.stdout.write(JSON.stringify(d, null, 2) + "\n");
' "$BIN" > "$DESTDIR$QEMUDATADIR/vhost-user/50-rnull.json"
chmod 0644 "$DESTDIR$QEMUDATADIR/vhost-user/50-rnull.json"

install -d -m 0755 "$DESTDIR$SYSCONFDIR/rnull"
if [[ -e "$DESTDIR$SYSCONFDIR/rnull/example.json" ]]; then
  echo "install-service: kept the existing $SYSCONFDIR/rnull/example.json"
else
  install -m 0644 systemd/example.json "$DESTDIR$SYSCONFDIR/rnull/example.json"
fi

if [[ -z "$DESTDIR" && "$UNITDIR" == /etc/systemd/system && -d /run/systemd/system ]] && command -v systemctl >/dev/null; then
  systemctl daemon-reload
fi
getent group kvm >/dev/null || echo "install-service: note: no group kvm on this host; the unit runs with Group=kvm (create it, or edit Group= and socket_group)" >&2
echo "install-service: installed $BIN, $UNITDIR/rnull@.service, $QEMUDATADIR/vhost-user/50-rnull.json, $SYSCONFDIR/rnull/example.json${DESTDIR:+ under $DESTDIR}"

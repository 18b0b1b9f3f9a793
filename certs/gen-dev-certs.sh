#!/usr/bin/env bash
# gen-dev-certs.sh - development TLS certificates and JWT keys for iot-hub.
#
#   certs/gen-dev-certs.sh [OUTDIR] [--client-cn gw-1] [--force]
#
# Makes, in OUTDIR (default: certs/out next to this script, git-ignored):
#   ca.pem ca.key                   dev CA
#   server.pem server.key           CN=localhost, SAN DNS:localhost, IP:127.0.0.1, IP:::1
#   client.pem client.key           client cert (CN from --client-cn, default dev-gw)
#   foreign-ca.pem foreign-ca.key   an unrelated CA
#   foreign-client.pem/.key         client cert with the same CN, signed by the foreign CA
#   jwt-rs256.key jwt-rs256.pub.pem RSA 2048 JWT signing key and its public key
#   jwt-es256.key jwt-es256.pub.pem EC P-256 JWT signing key and its public key
#   jwt-hs256.secret                HS256 secret: 64 hex characters, no newline
# Files that exist are kept unless --force; a certificate is remade when its
# CA was remade in the same run, and a client certificate when its CN is not
# --client-cn. Prints one line per file it made.
set -euo pipefail

usage() {
	sed -n '2,19s/^# \{0,1\}//p' "$0"
}

die() {
	echo "gen-dev-certs.sh: $*" >&2
	exit 2
}

script_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
outdir=""
client_cn="dev-gw"
force=0

while [ $# -gt 0 ]; do
	case "$1" in
	--client-cn)
		[ $# -ge 2 ] || die "--client-cn needs a value"
		client_cn=$2
		shift 2
		;;
	--client-cn=*)
		client_cn=${1#--client-cn=}
		shift
		;;
	--force)
		force=1
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	-*)
		die "unknown flag $1 (see --help)"
		;;
	*)
		[ -z "$outdir" ] || die "more than one OUTDIR given"
		outdir=$1
		shift
		;;
	esac
done

[ -n "$outdir" ] || outdir="$script_dir/out"
# The CN goes into -subj: keep it to the gateway-id alphabet (no '/', '=').
[[ "$client_cn" =~ ^[A-Za-z0-9._:-]{1,64}$ ]] ||
	die "--client-cn must match [A-Za-z0-9._:-]{1,64}"
command -v openssl >/dev/null || die "openssl not found"

mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)
umask 077

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
log="$tmp/openssl.log"

# Runs openssl quietly; on failure shows what it said.
ossl() {
	if ! openssl "$@" >"$log" 2>&1; then
		echo "gen-dev-certs.sh: openssl $1 failed:" >&2
		cat "$log" >&2
		exit 1
	fi
}

# want FILE...: true if any of the files must be (re)made.
want() {
	local f
	[ "$force" -eq 1 ] && return 0
	for f in "$@"; do
		[ -e "$outdir/$f" ] || return 0
	done
	return 1
}

# other_cn CERT: true if CERT exists with a CN other than --client-cn.
other_cn() {
	local subj
	[ -e "$outdir/$1" ] || return 1
	subj=$(openssl x509 -in "$outdir/$1" -noout -subject -nameopt RFC2253 \
		2>/dev/null) || return 0
	[[ ",${subj#subject=}," != *",CN=$client_cn,"* ]]
}

nmade=0
made() {
	local f
	for f in "$@"; do
		nmade=$((nmade + 1))
		echo "made $outdir/$f"
	done
}

ec_key() {
	ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-out "$tmp/$1"
	mv -f "$tmp/$1" "$outdir/$1"
}

# self-signed CA: ca_cert NAME CN
ca_cert() {
	ec_key "$1.key"
	ossl req -x509 -new -key "$outdir/$1.key" -sha256 -days 3650 \
		-subj "/O=iot-hub dev/CN=$2" \
		-addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
		-addext "keyUsage=critical,keyCertSign,cRLSign" \
		-addext "subjectKeyIdentifier=hash" \
		-out "$tmp/$1.pem"
	mv -f "$tmp/$1.pem" "$outdir/$1.pem"
	made "$1.pem" "$1.key"
}

# leaf signed by a CA: leaf_cert NAME CA CN EXTENSIONS
leaf_cert() {
	ec_key "$1.key"
	ossl req -new -key "$outdir/$1.key" -subj "/O=iot-hub dev/CN=$3" \
		-out "$tmp/$1.csr"
	printf '%s\n' "basicConstraints=critical,CA:FALSE" \
		"authorityKeyIdentifier=keyid" "subjectKeyIdentifier=hash" \
		"$4" >"$tmp/$1.ext"
	ossl x509 -req -in "$tmp/$1.csr" -CA "$outdir/$2.pem" \
		-CAkey "$outdir/$2.key" -set_serial "0x$(openssl rand -hex 16)" \
		-days 825 -sha256 -extfile "$tmp/$1.ext" -out "$tmp/$1.pem"
	mv -f "$tmp/$1.pem" "$outdir/$1.pem"
	made "$1.pem" "$1.key"
}

server_ext="keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1"
client_ext="keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"

new_ca=0
if want ca.pem ca.key; then
	ca_cert ca "iot-hub dev CA"
	new_ca=1
fi
if [ "$new_ca" -eq 1 ] || want server.pem server.key; then
	leaf_cert server ca localhost "$server_ext"
fi
if [ "$new_ca" -eq 1 ] || want client.pem client.key || other_cn client.pem; then
	leaf_cert client ca "$client_cn" "$client_ext"
fi

new_ca=0
if want foreign-ca.pem foreign-ca.key; then
	ca_cert foreign-ca "foreign dev CA"
	new_ca=1
fi
if [ "$new_ca" -eq 1 ] || want foreign-client.pem foreign-client.key ||
	other_cn foreign-client.pem; then
	leaf_cert foreign-client foreign-ca "$client_cn" "$client_ext"
fi

if want jwt-rs256.key jwt-rs256.pub.pem; then
	ossl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
		-out "$tmp/jwt-rs256.key"
	ossl pkey -in "$tmp/jwt-rs256.key" -pubout -out "$tmp/jwt-rs256.pub.pem"
	mv -f "$tmp/jwt-rs256.key" "$tmp/jwt-rs256.pub.pem" "$outdir/"
	made jwt-rs256.key jwt-rs256.pub.pem
fi
if want jwt-es256.key jwt-es256.pub.pem; then
	ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 \
		-out "$tmp/jwt-es256.key"
	ossl pkey -in "$tmp/jwt-es256.key" -pubout -out "$tmp/jwt-es256.pub.pem"
	mv -f "$tmp/jwt-es256.key" "$tmp/jwt-es256.pub.pem" "$outdir/"
	made jwt-es256.key jwt-es256.pub.pem
fi
if want jwt-hs256.secret; then
	openssl rand -hex 32 | tr -d '\n' >"$tmp/jwt-hs256.secret"
	[ "$(wc -c <"$tmp/jwt-hs256.secret")" -eq 64 ] ||
		die "openssl rand gave no secret"
	mv -f "$tmp/jwt-hs256.secret" "$outdir/"
	made jwt-hs256.secret
fi

# Certificates and keys are readable by their owner only (umask 077); the
# public parts may be shared.
chmod 644 "$outdir"/ca.pem "$outdir"/server.pem "$outdir"/client.pem \
	"$outdir"/foreign-ca.pem "$outdir"/foreign-client.pem \
	"$outdir"/jwt-rs256.pub.pem "$outdir"/jwt-es256.pub.pem

# Sanity: the chain holds, and the foreign client does not verify against ca.
ossl verify -CAfile "$outdir/ca.pem" "$outdir/server.pem" "$outdir/client.pem"
if openssl verify -CAfile "$outdir/ca.pem" "$outdir/foreign-client.pem" \
	>/dev/null 2>&1; then
	die "foreign-client.pem verifies against ca.pem (stale files? use --force)"
fi
[ "$nmade" -gt 0 ] || echo "all files already in $outdir (--force remakes them)"

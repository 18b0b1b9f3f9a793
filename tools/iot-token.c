/*
 * iot-token - mint development JWTs for gateways and make API keys.
 *
 *   iot-token jwt --alg HS256|RS256|ES256 --key FILE --sub ID [options]
 *   iot-token hash-key KEY|-
 *   iot-token new-key [--name N] [--scopes s1,s2] [--devices p1,p2]
 *
 * Every token is verified with the hub's own auth module before it is
 * printed, so what this tool prints is what the hub accepts. Keys and tokens
 * are never written to stderr.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <jansson.h>
#include <jwt.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>

#include "hub/auth.h"

#define TOK_KEY_FILE_MAX	(64 * 1024)
#define TOK_API_KEY_MAX		4096
#define TOK_ID_MAX		128
#define TOK_TTL_MAX		(10LL * 366 * 24 * 3600)

static const char usage_text[] =
"usage:\n"
"  iot-token jwt --alg HS256|RS256|ES256 --key FILE --sub ID\n"
"                [--devices 't-*,x'] [--scope 'telemetry:read commands:write']\n"
"                [--ttl SECONDS] [--exp UNIX] [--iss S] [--aud S]\n"
"      Prints a compact JWT for a gateway (sub = gateway id). --key is the\n"
"      HS256 secret file (its bytes less a trailing newline, at least 16) or, for\n"
"      RS256/ES256, the PEM private key. --devices: comma-separated device\n"
"      patterns (an id, or a prefix ending in '*'); without it the token\n"
"      speaks for no device. --ttl defaults to 3600; --exp sets exp itself.\n"
"\n"
"  iot-token hash-key KEY|-\n"
"      Prints the lower-case hex SHA-256 of KEY for the api-keys file\n"
"      (\"-\": read the key from stdin, one trailing newline dropped).\n"
"\n"
"  iot-token new-key [--name N] [--scopes s1,s2] [--devices p1,p2]\n"
"      Prints a new random API key (iotk_ + 32 random bytes, base64url) on\n"
"      stdout and its api-keys file entry on stderr. Scopes: telemetry:read\n"
"      (the default), commands:write, admin. Without --devices the key may\n"
"      act on every device.\n"
"\n"
"Exit status: 0 ok, 1 failure, 2 bad usage.\n";

static void tok_usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void tok_usage_error(const char *fmt, ...)
{
	va_list ap;

	fputs("iot-token: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputs(" (iot-token --help for usage)\n", stderr);
	exit(2);
}

static void tok_fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void tok_fail(const char *fmt, ...)
{
	va_list ap;

	fputs("iot-token: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static void *tok_xmalloc(size_t n)
{
	void *p = malloc(n ? n : 1);

	if (!p)
		tok_fail("out of memory");
	return p;
}

/* ---- flags -------------------------------------------------------------- */

struct tok_flag {
	const char *name;	/* "--alg" */
	const char **value;
};

/* Parses "--flag VALUE" and "--flag=VALUE" pairs from argv[i..]. */
static void tok_parse_flags(const char *cmd, int argc, char **argv, int i,
			    struct tok_flag *flags, size_t nflags)
{
	while (i < argc) {
		const char *arg = argv[i], *eq, *val;
		size_t namelen, f;

		if (strncmp(arg, "--", 2))
			tok_usage_error("%s: unexpected argument \"%s\"", cmd, arg);
		eq = strchr(arg, '=');
		namelen = eq ? (size_t)(eq - arg) : strlen(arg);
		for (f = 0; f < nflags; f++)
			if (strlen(flags[f].name) == namelen &&
			    !strncmp(flags[f].name, arg, namelen))
				break;
		if (f == nflags)
			tok_usage_error("%s: unknown flag %.*s", cmd, (int)namelen,
					arg);
		if (eq) {
			val = eq + 1;
			i++;
		} else {
			if (i + 1 >= argc)
				tok_usage_error("%s: %s needs a value", cmd,
						flags[f].name);
			val = argv[i + 1];
			i += 2;
		}
		if (*flags[f].value)
			tok_usage_error("%s: %s given twice", cmd, flags[f].name);
		*flags[f].value = val;
	}
}

static long long tok_parse_int(const char *cmd, const char *flag,
			       const char *s, long long min, long long max)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(s, &end, 10);
	if (errno || end == s || *end || v < min || v > max)
		tok_usage_error("%s: %s must be an integer in %lld..%lld", cmd,
				flag, min, max);
	return v;
}

/* ---- ids, patterns, scopes ---------------------------------------------- */

static int tok_id_char(unsigned char c)
{
	return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
	       (c >= '0' && c <= '9') || c == '.' || c == '_' || c == ':' ||
	       c == '-';
}

static int tok_valid_id(const char *s, size_t n)
{
	if (n < 1 || n > TOK_ID_MAX)
		return 0;
	for (size_t i = 0; i < n; i++)
		if (!tok_id_char((unsigned char)s[i]))
			return 0;
	return 1;
}

static int tok_valid_pattern(const char *s, size_t n)
{
	if (n > 0 && s[n - 1] == '*') {
		if (n - 1 > TOK_ID_MAX)
			return 0;
		for (size_t i = 0; i + 1 < n; i++)
			if (!tok_id_char((unsigned char)s[i]))
				return 0;
		return 1;
	}
	return tok_valid_id(s, n);
}

static int tok_known_scope(const char *s, size_t n)
{
	static const char *const known[] = { "telemetry:read", "commands:write",
					     "admin" };

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strlen(known[i]) == n && !memcmp(known[i], s, n))
			return 1;
	return 0;
}

/* Splits list on sep into a JSON array of strings, each checked with valid().
 * An empty list gives an empty array. */
static json_t *tok_split(const char *cmd, const char *flag, const char *list,
			 char sep, int (*valid)(const char *, size_t),
			 const char *what)
{
	json_t *arr = json_array();
	const char *p = list;

	if (!arr)
		tok_fail("out of memory");
	while (*p) {
		const char *end = strchr(p, sep);
		size_t n = end ? (size_t)(end - p) : strlen(p);

		if (n) {
			if (!valid(p, n))
				tok_usage_error("%s: %s: \"%.*s\" is not %s", cmd,
						flag, (int)(n > 140 ? 140 : n), p,
						what);
			if (json_array_append_new(arr, json_stringn(p, n)))
				tok_fail("out of memory");
		}
		if (!end)
			break;
		p = end + 1;
	}
	return arr;
}

/* ---- files and keys ----------------------------------------------------- */

static unsigned char *tok_read_file(const char *path, size_t *lenp)
{
	FILE *f = fopen(path, "rb");
	unsigned char *buf;
	size_t n;

	if (!f)
		tok_fail("%s: %s", path, strerror(errno));
	buf = tok_xmalloc(TOK_KEY_FILE_MAX + 1);
	n = fread(buf, 1, TOK_KEY_FILE_MAX + 1, f);
	if (ferror(f))
		tok_fail("%s: read error", path);
	fclose(f);
	if (n > TOK_KEY_FILE_MAX)
		tok_fail("%s: larger than %d bytes", path, TOK_KEY_FILE_MAX);
	buf[n] = '\0';
	*lenp = n;
	return buf;
}

static int tok_no_passphrase(char *buf, int size, int rwflag, void *u)
{
	(void)buf;
	(void)size;
	(void)rwflag;
	(void)u;
	return -1;
}

/* Checks the PEM private key for alg and returns its public key as PEM (for
 * the self-check). free() the result. */
static char *tok_check_private_key(const char *path, const unsigned char *pem,
				   size_t len, enum auth_jwt_alg alg)
{
	BIO *bio = BIO_new_mem_buf(pem, (int)len);
	EVP_PKEY *pk;
	char *pub, *data;
	long n;
	int id;

	if (!bio)
		tok_fail("out of memory");
	pk = PEM_read_bio_PrivateKey(bio, NULL, tok_no_passphrase, NULL);
	BIO_free(bio);
	if (!pk)
		tok_fail("%s: not an unencrypted PEM private key", path);
	id = EVP_PKEY_get_base_id(pk);
	if (alg == AUTH_ALG_RS256 && id != EVP_PKEY_RSA)
		tok_fail("%s: RS256 needs an RSA private key", path);
	if (alg == AUTH_ALG_ES256) {
		char group[64] = "";
		size_t glen = 0;

		if (id != EVP_PKEY_EC ||
		    !EVP_PKEY_get_group_name(pk, group, sizeof(group), &glen) ||
		    (strcmp(group, "prime256v1") && strcmp(group, "P-256")))
			tok_fail("%s: ES256 needs an EC P-256 private key", path);
	}
	bio = BIO_new(BIO_s_mem());
	if (!bio || !PEM_write_bio_PUBKEY(bio, pk))
		tok_fail("cannot derive the public key from %s", path);
	n = BIO_get_mem_data(bio, &data);
	pub = tok_xmalloc((size_t)n + 1);
	memcpy(pub, data, (size_t)n);
	pub[n] = '\0';
	BIO_free(bio);
	EVP_PKEY_free(pk);
	ERR_clear_error();
	return pub;
}

static char *tok_b64url(const unsigned char *p, size_t len)
{
	static const char tab[] =
		"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
	char *out = tok_xmalloc(len / 3 * 4 + 4);
	size_t o = 0, i;

	for (i = 0; i + 2 < len; i += 3) {
		unsigned long v = (unsigned long)p[i] << 16 |
				  (unsigned long)p[i + 1] << 8 | p[i + 2];

		out[o++] = tab[v >> 18 & 63];
		out[o++] = tab[v >> 12 & 63];
		out[o++] = tab[v >> 6 & 63];
		out[o++] = tab[v & 63];
	}
	if (len - i == 1) {
		out[o++] = tab[p[i] >> 2];
		out[o++] = tab[(p[i] & 3) << 4];
	} else if (len - i == 2) {
		out[o++] = tab[p[i] >> 2];
		out[o++] = tab[(p[i] & 3) << 4 | p[i + 1] >> 4];
		out[o++] = tab[(p[i + 1] & 15) << 2];
	}
	out[o] = '\0';
	return out;
}

/* ---- jwt ---------------------------------------------------------------- */

static int cmd_jwt(int argc, char **argv)
{
	const char *alg_s = NULL, *key_path = NULL, *sub = NULL, *devices = NULL,
		   *scope = NULL, *ttl_s = NULL, *exp_s = NULL, *iss = NULL,
		   *aud = NULL;
	struct tok_flag flags[] = {
		{ "--alg", &alg_s }, { "--key", &key_path }, { "--sub", &sub },
		{ "--devices", &devices }, { "--scope", &scope },
		{ "--ttl", &ttl_s }, { "--exp", &exp_s }, { "--iss", &iss },
		{ "--aud", &aud },
	};
	enum auth_jwt_alg alg;
	jwt_alg_t jalg;
	long long now = (long long)time(NULL), exp, ttl = 3600;
	unsigned char *key;
	size_t key_len;
	char *pub = NULL, *claims_txt, *token, err[256];
	json_t *claims;
	jwt_t *j = NULL;
	auth_config cfg = { 0 };
	hub_auth *a;
	int rc;

	tok_parse_flags("jwt", argc, argv, 2, flags,
			sizeof(flags) / sizeof(flags[0]));
	if (!alg_s)
		tok_usage_error("jwt: --alg is required (HS256, RS256 or ES256)");
	if (!strcmp(alg_s, "HS256")) {
		alg = AUTH_ALG_HS256;
		jalg = JWT_ALG_HS256;
	} else if (!strcmp(alg_s, "RS256")) {
		alg = AUTH_ALG_RS256;
		jalg = JWT_ALG_RS256;
	} else if (!strcmp(alg_s, "ES256")) {
		alg = AUTH_ALG_ES256;
		jalg = JWT_ALG_ES256;
	} else {
		tok_usage_error("jwt: --alg must be HS256, RS256 or ES256");
	}
	if (!key_path)
		tok_usage_error("jwt: --key FILE is required");
	if (!sub)
		tok_usage_error("jwt: --sub ID is required");
	if (!tok_valid_id(sub, strlen(sub)))
		tok_usage_error("jwt: --sub must match [A-Za-z0-9._:-]{1,128}");
	if (ttl_s && exp_s)
		tok_usage_error("jwt: give --ttl or --exp, not both");
	if (ttl_s)
		ttl = tok_parse_int("jwt", "--ttl", ttl_s, 1, TOK_TTL_MAX);
	exp = exp_s ? tok_parse_int("jwt", "--exp", exp_s, 1, LLONG_MAX / 2) :
		      now + ttl;

	claims = json_pack("{s:s, s:I, s:I}", "sub", sub, "iat", (json_int_t)now,
			   "exp", (json_int_t)exp);
	if (!claims)
		tok_fail("out of memory");
	if (iss && json_object_set_new(claims, "iss", json_string(iss)))
		tok_usage_error("jwt: --iss must be UTF-8 text");
	if (aud && json_object_set_new(claims, "aud", json_string(aud)))
		tok_usage_error("jwt: --aud must be UTF-8 text");
	if (devices)
		json_object_set_new(claims, "devices",
				    tok_split("jwt", "--devices", devices, ',',
					      tok_valid_pattern,
					      "a device id or a prefix ending in '*'"));
	if (scope) {
		json_decref(tok_split("jwt", "--scope", scope, ' ',
				      tok_known_scope,
				      "telemetry:read, commands:write or admin"));
		json_object_set_new(claims, "scope", json_string(scope));
	}
	claims_txt = json_dumps(claims, JSON_COMPACT);
	json_decref(claims);
	if (!claims_txt)
		tok_fail("out of memory");

	key = tok_read_file(key_path, &key_len);
	if (alg == AUTH_ALG_HS256) {
		/* Same rule as the hub (hub/hub.c): a secret file's trailing
		 * newline is not part of the secret. */
		while (key_len && (key[key_len - 1] == '\n' || key[key_len - 1] == '\r'))
			key[--key_len] = '\0';
		if (key_len < 16)
			tok_fail("%s: HS256 secret is %zu bytes; at least 16 are "
				 "required", key_path, key_len);
	} else {
		pub = tok_check_private_key(key_path, key, key_len, alg);
	}

	if (jwt_new(&j) || jwt_add_grants_json(j, claims_txt) ||
	    jwt_set_alg(j, jalg, key, (int)key_len))
		tok_fail("libjwt refused the claims or the key");
	token = jwt_encode_str(j);
	jwt_free(j);
	free(claims_txt);
	if (!token)
		tok_fail("libjwt could not sign the token");

	/* Self-check with the hub's verifier (at exp for an already expired
	 * token, which is allowed for tests). */
	cfg.alg = alg;
	cfg.jwt_key = alg == AUTH_ALG_HS256 ? (const char *)key : pub;
	cfg.jwt_key_len = alg == AUTH_ALG_HS256 ? key_len : strlen(pub);
	cfg.issuer = iss;
	cfg.audience = aud;
	a = auth_new(&cfg, err, sizeof(err));
	if (!a)
		tok_fail("self-check: %s", err);
	rc = auth_verify_jwt(a, token, strlen(token), exp < now ? exp : now,
			     NULL);
	auth_free(a);
	if (rc != AUTH_OK)
		tok_fail("self-check: the hub would refuse this token: %s",
			 auth_strerror(rc));

	OPENSSL_cleanse(key, key_len);
	free(key);
	free(pub);
	printf("%s\n", token);
	free(token);
	return fflush(stdout) ? 1 : 0;
}

/* ---- hash-key ----------------------------------------------------------- */

static int cmd_hash_key(int argc, char **argv)
{
	char hex[65], buf[TOK_API_KEY_MAX + 2];
	const char *key;
	size_t len;

	if (argc != 3)
		tok_usage_error("hash-key: expected exactly one KEY (or - for "
				"stdin)");
	if (!strcmp(argv[2], "-")) {
		len = fread(buf, 1, sizeof(buf) - 1, stdin);
		if (ferror(stdin))
			tok_fail("hash-key: cannot read stdin");
		if (len > TOK_API_KEY_MAX)
			tok_fail("hash-key: key longer than %d bytes",
				 TOK_API_KEY_MAX);
		if (len && buf[len - 1] == '\n')
			len--;
		if (len && buf[len - 1] == '\r')
			len--;
		key = buf;
	} else {
		key = argv[2];
		len = strlen(key);
	}
	if (!len)
		tok_usage_error("hash-key: the key is empty");
	auth_sha256_hex(key, len, hex);
	OPENSSL_cleanse(buf, sizeof(buf));
	printf("%s\n", hex);
	return fflush(stdout) ? 1 : 0;
}

/* ---- new-key ------------------------------------------------------------ */

static int cmd_new_key(int argc, char **argv)
{
	const char *name = NULL, *scopes = NULL, *devices = NULL;
	struct tok_flag flags[] = {
		{ "--name", &name }, { "--scopes", &scopes },
		{ "--devices", &devices },
	};
	unsigned char rnd[32];
	char *b64, *key, hex[65], defname[16], *entry_txt;
	json_t *entry, *scope_arr;
	size_t keylen;

	tok_parse_flags("new-key", argc, argv, 2, flags,
			sizeof(flags) / sizeof(flags[0]));
	if (name && !tok_valid_id(name, strlen(name)))
		tok_usage_error("new-key: --name must match "
				"[A-Za-z0-9._:-]{1,128}");
	scope_arr = tok_split("new-key", "--scopes",
			      scopes ? scopes : "telemetry:read", ',',
			      tok_known_scope,
			      "telemetry:read, commands:write or admin");

	if (RAND_bytes(rnd, sizeof(rnd)) != 1)
		tok_fail("new-key: no random bytes from OpenSSL");
	b64 = tok_b64url(rnd, sizeof(rnd));
	OPENSSL_cleanse(rnd, sizeof(rnd));
	keylen = strlen("iotk_") + strlen(b64);
	key = tok_xmalloc(keylen + 1);
	snprintf(key, keylen + 1, "iotk_%s", b64);
	OPENSSL_cleanse(b64, strlen(b64));
	free(b64);
	auth_sha256_hex(key, keylen, hex);
	if (!name) {
		snprintf(defname, sizeof(defname), "key-%.8s", hex);
		name = defname;
	}

	entry = json_pack("{s:s, s:s, s:o}", "name", name, "sha256", hex,
			  "scopes", scope_arr);
	if (!entry)
		tok_fail("out of memory");
	if (devices)
		json_object_set_new(entry, "devices",
				    tok_split("new-key", "--devices", devices, ',',
					      tok_valid_pattern,
					      "a device id or a prefix ending in '*'"));
	entry_txt = json_dumps(entry, JSON_COMPACT);
	json_decref(entry);
	if (!entry_txt)
		tok_fail("out of memory");

	printf("%s\n", key);
	OPENSSL_cleanse(key, keylen);
	free(key);
	if (fflush(stdout))
		return 1;
	fprintf(stderr, "%s\n", entry_txt);
	free(entry_txt);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : NULL;

	if (!cmd) {
		fputs(usage_text, stderr);
		return 2;
	}
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
		fputs(usage_text, stdout);
		return 0;
	}
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			fputs(usage_text, stdout);
			return 0;
		}
	}
	if (!strcmp(cmd, "jwt"))
		return cmd_jwt(argc, argv);
	if (!strcmp(cmd, "hash-key"))
		return cmd_hash_key(argc, argv);
	if (!strcmp(cmd, "new-key"))
		return cmd_new_key(argc, argv);
	tok_usage_error("unknown command \"%.40s\" (jwt, hash-key, new-key)", cmd);
}

/*
 * iot-token: mints development JWTs for gateways and makes API keys for the
 * hub (`jwt`, `hash-key`, `new-key`). Every token is verified with the hub's
 * own auth module before it is printed, so what this tool prints is what the
 * hub accepts. Keys and tokens are never written to stderr. Each command's
 * flags come from its options table (hub/opts.h); every flag takes a value
 * and may be given once.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
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
#include "hub/opts.h"
#include "hub/util.h"

#define TOK_KEY_FILE_MAX	(64 * 1024)
#define TOK_API_KEY_MAX		4096
#define TOK_TTL_MAX		(10LL * 366 * 24 * 3600)

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

/* ---- flags -------------------------------------------------------------- */

static struct tok {
	const char *alg, *key, *sub, *devices, *scope, *ttl, *exp, *iss, *aud;  /* jwt */
	const char *name, *scopes;                                               /* new-key */
} t;

/* op->data: the field; a flag given twice is an error */
static int once(void *obj, const struct opt *op, const char *val, char *err, size_t errlen)
{
	const char **f = (const char **)(uintptr_t)op->data;

	if (*f) {
		snprintf(err, errlen, "--%s given twice", op->name);
		return -1;
	}
	*f = val;   /* argv's, for the process's life */
	return 0;
}

#define F(n, f, meta, help) { n, OPT_STR, OPT_NO_FIELD, NULL, 0, 0, help, meta, 0, once, &t.f }

static const struct opt jwt_opts[] = {
	F("alg", alg, "ALG", "HS256, RS256 or ES256 (required)"),
	F("key", key, "FILE", "the HS256 secret file (its bytes less a trailing newline, at\n"
	  "least 16) or, for RS256/ES256, the PEM private key (required)"),
	F("sub", sub, "ID", "the gateway id (required)"),
	F("devices", devices, "'t-*,x'", "device patterns (an id, or a prefix ending in '*');\n"
	  "without it the token speaks for no device"),
	F("scope", scope, "'s1 s2'", "telemetry:read, commands:write, admin"),
	F("ttl", ttl, "SECONDS", "exp = now + SECONDS (default 3600)"),
	F("exp", exp, "UNIX", "exp itself"),
	F("iss", iss, "S", "iss claim"),
	F("aud", aud, "S", "aud claim"),
};

static const struct opt new_key_opts[] = {
	F("name", name, "N", "the entry's name (default key-<hash prefix>)"),
	F("scopes", scopes, "s1,s2", "telemetry:read (the default), commands:write, admin"),
	F("devices", devices, "p1,p2", "device patterns; without it the key may act on every\n"
	  "device"),
};

#define N(a) a, sizeof(a) / sizeof(a[0])

static void usage(FILE *f)
{
	fputs("usage:\n  iot-token jwt --alg HS256|RS256|ES256 --key FILE --sub ID [options]\n"
	      "      Prints a compact JWT for a gateway (sub = gateway id).\n", f);
	opts_usage(N(jwt_opts), f);
	fputs("\n  iot-token hash-key KEY|-\n"
	      "      Prints the lower-case hex SHA-256 of KEY for the api-keys file\n"
	      "      (\"-\": read the key from stdin, one trailing newline dropped).\n"
	      "\n  iot-token new-key [options]\n"
	      "      Prints a new random API key (iotk_ + 32 random bytes, base64url) on\n"
	      "      stdout and its api-keys file entry on stderr.\n", f);
	opts_usage(N(new_key_opts), f);
	fputs("\nExit status: 0 ok, 1 failure, 2 bad usage.\n", f);
}

static void parse(const struct opt *o, size_t n, int argc, char **argv)
{
	const struct opts_tab tab = { o, n, &t };
	const struct opts_cli cli = { &tab, 1, NULL, NULL, NULL };
	int i = 2;

	opts_argv_or_exit(&cli, argc, argv, &i, usage);
}

static long long tok_parse_int(const char *flag, const char *s, long long min, long long max)
{
	int64_t v;

	if (hub_parse_i64(s, strlen(s), min, max, &v))
		opts_die("jwt: %s must be an integer in %lld..%lld", flag, min, max);
	return v;
}

/* ---- patterns, scopes ---------------------------------------------------- */

static int tok_valid_id(const char *s, size_t n)
{
	return hub_id_valid(s, n);
}

static int tok_valid_pattern(const char *s, size_t n)
{
	return n && s[n - 1] == '*' ? n == 1 || hub_id_valid(s, n - 1) : hub_id_valid(s, n);
}

static int tok_known_scope(const char *s, size_t n)
{
	static const char *const known[] = { "telemetry:read", "commands:write", "admin" };

	for (size_t i = 0; i < sizeof(known) / sizeof(known[0]); i++)
		if (strlen(known[i]) == n && !memcmp(known[i], s, n))
			return 1;
	return 0;
}

/* Splits list on sep into a JSON array of strings, each checked with valid().
 * An empty list gives an empty array. */
static json_t *tok_split(const char *cmd, const char *flag, const char *list, char sep,
			 int (*valid)(const char *, size_t), const char *what)
{
	json_t *arr = json_array();

	for (const char *p = list; *p;) {
		const char *end = strchr(p, sep);
		size_t n = end ? (size_t)(end - p) : strlen(p);

		if (n && !valid(p, n))
			opts_die("%s: %s: \"%.*s\" is not %s", cmd, flag, (int)(n > 140 ? 140 : n),
				 p, what);
		if (n && json_array_append_new(arr, json_stringn(p, n)))
			tok_fail("out of memory");
		if (!end)
			break;
		p = end + 1;
	}
	return arr;
}

/* ---- files and keys ----------------------------------------------------- */

static int tok_no_passphrase(char *buf, int size, int rwflag, void *u)
{
	return -1;
}

/* Checks the PEM private key for alg and returns its public key as PEM (for
 * the self-check). free() the result. */
static char *tok_check_private_key(const char *path, const char *pem, size_t len,
				   enum auth_jwt_alg alg)
{
	BIO *bio = BIO_new_mem_buf(pem, (int)len);
	EVP_PKEY *pk;
	char *pub, *data, group[64] = "";
	size_t glen = 0;
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
	if (alg == AUTH_ALG_ES256 &&
	    (id != EVP_PKEY_EC || !EVP_PKEY_get_group_name(pk, group, sizeof(group), &glen) ||
	     (strcmp(group, "prime256v1") && strcmp(group, "P-256"))))
		tok_fail("%s: ES256 needs an EC P-256 private key", path);
	bio = BIO_new(BIO_s_mem());
	if (!bio || !PEM_write_bio_PUBKEY(bio, pk))
		tok_fail("cannot derive the public key from %s", path);
	n = BIO_get_mem_data(bio, &data);
	pub = strndup(data, (size_t)n);
	if (!pub)
		tok_fail("out of memory");
	BIO_free(bio);
	EVP_PKEY_free(pk);
	ERR_clear_error();
	return pub;
}

/* ---- jwt ---------------------------------------------------------------- */

static int cmd_jwt(int argc, char **argv)
{
	static const struct { const char *name; enum auth_jwt_alg alg; jwt_alg_t jalg; } algs[] = {
		{ "HS256", AUTH_ALG_HS256, JWT_ALG_HS256 },
		{ "RS256", AUTH_ALG_RS256, JWT_ALG_RS256 },
		{ "ES256", AUTH_ALG_ES256, JWT_ALG_ES256 },
	};
	long long now = (long long)time(NULL), exp, ttl = 3600;
	size_t key_len, a;
	char *key, *pub = NULL, *claims_txt, *token, err[256];
	json_t *claims;
	jwt_t *j = NULL;
	auth_config cfg = { 0 };
	hub_auth *ha;
	enum auth_result rc;

	parse(N(jwt_opts), argc, argv);
	if (!t.alg)
		opts_die("jwt: --alg is required (HS256, RS256 or ES256)");
	for (a = 0; a < 3 && strcmp(t.alg, algs[a].name); a++)
		;
	if (a == 3)
		opts_die("jwt: --alg must be HS256, RS256 or ES256");
	if (!t.key)
		opts_die("jwt: --key FILE is required");
	if (!t.sub)
		opts_die("jwt: --sub ID is required");
	if (!tok_valid_id(t.sub, strlen(t.sub)))
		opts_die("jwt: --sub must match [A-Za-z0-9._:-]{1,128}");
	if (t.ttl && t.exp)
		opts_die("jwt: give --ttl or --exp, not both");
	if (t.ttl)
		ttl = tok_parse_int("--ttl", t.ttl, 1, TOK_TTL_MAX);
	exp = t.exp ? tok_parse_int("--exp", t.exp, 1, LLONG_MAX / 2) : now + ttl;

	claims = json_pack("{s:s, s:I, s:I}", "sub", t.sub, "iat", (json_int_t)now,
			   "exp", (json_int_t)exp);
	if (!claims)
		tok_fail("out of memory");
	if (t.iss && json_object_set_new(claims, "iss", json_string(t.iss)))
		opts_die("jwt: --iss must be UTF-8 text");
	if (t.aud && json_object_set_new(claims, "aud", json_string(t.aud)))
		opts_die("jwt: --aud must be UTF-8 text");
	if (t.devices)
		json_object_set_new(claims, "devices",
				    tok_split("jwt", "--devices", t.devices, ',', tok_valid_pattern,
					      "a device id or a prefix ending in '*'"));
	if (t.scope) {
		json_decref(tok_split("jwt", "--scope", t.scope, ' ', tok_known_scope,
				      "telemetry:read, commands:write or admin"));
		json_object_set_new(claims, "scope", json_string(t.scope));
	}
	claims_txt = json_dumps(claims, JSON_COMPACT);
	json_decref(claims);
	if (!claims_txt)
		tok_fail("out of memory");

	key = hub_read_file(t.key, TOK_KEY_FILE_MAX, &key_len);
	if (!key)
		tok_fail("%s: %s", t.key, errno == EFBIG ? "larger than 65536 bytes" :
			 strerror(errno));
	if (algs[a].alg == AUTH_ALG_HS256) {
		/* Same rule as the hub (hub/hub.c): a secret file's trailing
		 * newline is not part of the secret. */
		while (key_len && (key[key_len - 1] == '\n' || key[key_len - 1] == '\r'))
			key[--key_len] = '\0';
		if (key_len < 16)
			tok_fail("%s: HS256 secret is %zu bytes; at least 16 are required", t.key,
				 key_len);
	} else {
		pub = tok_check_private_key(t.key, key, key_len, algs[a].alg);
	}

	if (jwt_new(&j) || jwt_add_grants_json(j, claims_txt) ||
	    jwt_set_alg(j, algs[a].jalg, (unsigned char *)key, (int)key_len))
		tok_fail("libjwt refused the claims or the key");
	token = jwt_encode_str(j);
	jwt_free(j);
	free(claims_txt);
	if (!token)
		tok_fail("libjwt could not sign the token");

	/* Self-check with the hub's verifier (at exp for an already expired
	 * token, which is allowed for tests). */
	cfg.alg = algs[a].alg;
	cfg.jwt_key = pub ? pub : key;
	cfg.jwt_key_len = pub ? strlen(pub) : key_len;
	cfg.issuer = t.iss;
	cfg.audience = t.aud;
	ha = auth_new(&cfg, err, sizeof(err));
	if (!ha)
		tok_fail("self-check: %s", err);
	rc = auth_verify_jwt(ha, token, strlen(token), exp < now ? exp : now, NULL);
	auth_free(ha);
	if (rc != AUTH_OK)
		tok_fail("self-check: the hub would refuse this token: %s", auth_strerror(rc));

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
		opts_die("hash-key: expected exactly one KEY (or - for stdin)");
	if (!strcmp(argv[2], "-")) {
		len = fread(buf, 1, sizeof(buf) - 1, stdin);
		if (ferror(stdin))
			tok_fail("hash-key: cannot read stdin");
		if (len > TOK_API_KEY_MAX)
			tok_fail("hash-key: key longer than %d bytes", TOK_API_KEY_MAX);
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
		opts_die("hash-key: the key is empty");
	auth_sha256_hex(key, len, hex);
	OPENSSL_cleanse(buf, sizeof(buf));
	printf("%s\n", hex);
	return fflush(stdout) ? 1 : 0;
}

/* ---- new-key ------------------------------------------------------------ */

static int cmd_new_key(int argc, char **argv)
{
	unsigned char rnd[32];
	char key[64] = "iotk_", hex[65], defname[16], *entry_txt;
	const char *name;
	json_t *entry, *scope_arr;
	size_t keylen;

	parse(N(new_key_opts), argc, argv);
	if (t.name && !tok_valid_id(t.name, strlen(t.name)))
		opts_die("new-key: --name must match [A-Za-z0-9._:-]{1,128}");
	scope_arr = tok_split("new-key", "--scopes", t.scopes ? t.scopes : "telemetry:read", ',',
			      tok_known_scope, "telemetry:read, commands:write or admin");

	if (RAND_bytes(rnd, sizeof(rnd)) != 1)
		tok_fail("new-key: no random bytes from OpenSSL");
	/* base64url without padding: 32 bytes are 43 characters */
	EVP_EncodeBlock((unsigned char *)key + 5, rnd, sizeof(rnd));
	OPENSSL_cleanse(rnd, sizeof(rnd));
	key[5 + 43] = '\0';
	for (char *p = key + 5; *p; p++)
		*p = *p == '+' ? '-' : *p == '/' ? '_' : *p;
	keylen = strlen(key);
	auth_sha256_hex(key, keylen, hex);
	snprintf(defname, sizeof(defname), "key-%.8s", hex);
	name = t.name ? t.name : defname;

	entry = json_pack("{s:s, s:s, s:o}", "name", name, "sha256", hex, "scopes", scope_arr);
	if (!entry)
		tok_fail("out of memory");
	if (t.devices)
		json_object_set_new(entry, "devices",
				    tok_split("new-key", "--devices", t.devices, ',',
					      tok_valid_pattern,
					      "a device id or a prefix ending in '*'"));
	entry_txt = json_dumps(entry, JSON_COMPACT);
	json_decref(entry);
	if (!entry_txt)
		tok_fail("out of memory");

	printf("%s\n", key);
	OPENSSL_cleanse(key, keylen);
	if (fflush(stdout))
		return 1;
	fprintf(stderr, "%s\n", entry_txt);
	free(entry_txt);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd = argc > 1 ? argv[1] : NULL;
	int rc;

	if (!cmd) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(cmd, "-h") || !strcmp(cmd, "--help") || !strcmp(cmd, "help")) {
		usage(stdout);
		return 0;
	}
	for (int i = 2; i < argc; i++) {
		if (!strcmp(argv[i], "-h") || !strcmp(argv[i], "--help")) {
			usage(stdout);
			return 0;
		}
	}
	if (!strcmp(cmd, "jwt"))
		rc = cmd_jwt(argc, argv);
	else if (!strcmp(cmd, "hash-key"))
		rc = cmd_hash_key(argc, argv);
	else if (!strcmp(cmd, "new-key"))
		rc = cmd_new_key(argc, argv);
	else
		opts_die("unknown command \"%.40s\" (jwt, hash-key, new-key)", cmd);
	return rc;
}

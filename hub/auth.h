/*
 * auth.h - gateway JWTs, API keys and device patterns.
 *
 * JWT verification pins the configured algorithm (libjwt 1.10.2 accepts
 * whatever alg the token names, none included: docs/pitfalls.md) and checks
 * every claim itself, since libjwt checks none: exp (required, integer), nbf,
 * iss and aud when configured. API keys are kept only as SHA-256 hashes and
 * compared in constant time. No libwebsockets here; every function is cheap
 * enough for an lws callback except auth_new().
 */
#ifndef HUB_AUTH_H
#define HUB_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct hub_auth hub_auth;

enum auth_scope {
	AUTH_SCOPE_TELEMETRY_READ = 1u << 0, /* "telemetry:read" */
	AUTH_SCOPE_COMMANDS_WRITE = 1u << 1, /* "commands:write" */
	AUTH_SCOPE_ADMIN          = 1u << 2, /* "admin": implies every scope */
};

enum auth_jwt_alg { AUTH_ALG_HS256, AUTH_ALG_RS256, AUTH_ALG_ES256 };

/* Device-id patterns: an exact id, or a prefix ending in '*' ("*" = all). */
typedef struct auth_patterns {
	char **items;
	size_t n;
	bool all;      /* no restriction (API key without "devices", or "*") */
} auth_patterns;

/* Who a verified token or key speaks for. Owns its strings. */
#define AUTH_TIER_MAX 32          /* longest tier name of an API key */

typedef struct auth_principal {
	char name[129];         /* JWT sub, or the API key's name */
	char jti[65];           /* JWT jti when a string of 1..64 bytes, else "" */
	unsigned scopes;        /* enum auth_scope bits */
	auth_patterns devices;  /* JWT `devices` claim or the key's "devices" */
	int64_t exp;            /* JWT exp (seconds), 0 for API keys */
	bool has_devices_claim; /* JWT: the `devices` claim was present */
	bool is_api_key;
	char tier[AUTH_TIER_MAX + 1]; /* API key: its "tier" ("" = api-default-tier) */
} auth_principal;

typedef struct auth_config {
	enum auth_jwt_alg alg;
	const char *jwt_key;       /* HS256 secret bytes or PEM public key */
	size_t jwt_key_len;
	const char *issuer;        /* NULL: not checked */
	const char *audience;      /* NULL: not checked */
	int leeway_s;              /* tolerance for exp/nbf */
	const char *api_keys_file; /* NULL: no API keys */
} auth_config;

/* Builds the verifier. Reads api_keys_file (JSON array of {"name","sha256",
 * "scopes":[...],"devices":[...]}); copies everything it keeps. Returns NULL
 * with a one-line reason in err. Free with auth_free() (NULL-safe). */
hub_auth *auth_new(const auth_config *cfg, char *err, size_t errlen);
void auth_free(hub_auth *a);

/* The verdict on a token or key: AUTH_OK (0), or why it is refused
 * (docs/hacking.md "Errors": a result, not an error of the function). */
enum auth_result {
	AUTH_OK = 0,
	AUTH_MALFORMED,            /* not a JWT / undecodable */
	AUTH_BAD_ALG,              /* alg differs from the pinned one (incl. none) */
	AUTH_BAD_SIGNATURE,
	AUTH_EXPIRED,              /* exp missing, not an integer, or past */
	AUTH_NOT_YET,              /* nbf in the future */
	AUTH_BAD_ISSUER,
	AUTH_BAD_AUDIENCE,
	AUTH_BAD_CLAIMS,           /* sub missing/invalid, devices not an array of strings, ... */
	AUTH_UNKNOWN_KEY,          /* API key not configured */
	AUTH__COUNT
};

/* Short static description of r ("ok" for AUTH_OK), as told to the client. */
const char *auth_strerror(enum auth_result r);

/* Verifies a compact JWT (token[0..len), not NUL-terminated) at time now_s.
 * On AUTH_OK fills *out when it is not NULL (caller must
 * auth_principal_clear it): name = sub, devices = `devices` claim (absent:
 * no devices), scopes from the `scope` claim (space-separated string or
 * array of strings). */
enum auth_result auth_verify_jwt(const hub_auth *a, const char *token, size_t len,
				 int64_t now_s, auth_principal *out);

/* Looks an API key up by the SHA-256 of its bytes: AUTH_OK or
 * AUTH_UNKNOWN_KEY. On AUTH_OK fills *out when it is not NULL
 * (devices.all when the key has no "devices"). */
enum auth_result auth_check_api_key(const hub_auth *a, const char *key, size_t len,
				    auth_principal *out);

/* Releases what a principal owns; leaves it zeroed. NULL-safe. */
void auth_principal_clear(auth_principal *p);

/* Deep copy of src into dst (which it overwrites). Aborts when out of
 * memory. */
void auth_principal_copy(auth_principal *dst, const auth_principal *src);

/* True if the principal has the scope (admin has all). */
bool auth_has_scope(const auth_principal *p, unsigned scope);

/* True if device (NUL-terminated) matches one of the patterns. */
bool auth_patterns_match(const auth_patterns *pats, const char *device);

/* Frees the patterns' strings (a principal's devices moved out of it). */
void auth_patterns_free(auth_patterns *p);

/* Lower-case hex SHA-256 of data into out[65]. */
void auth_sha256_hex(const void *data, size_t len, char out[65]);

#endif

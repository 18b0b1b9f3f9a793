/* libFuzzer harness: JWT verification and API-key lookup with hostile input.
 * A fixed HS256 verifier (issuer and audience configured); nothing the fuzzer
 * makes without the secret may verify. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "hub/auth.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static hub_auth *verifier(void)
{
	static hub_auth *a;
	char err[256];

	if (!a) {
		auth_config cfg = {
			.alg = AUTH_ALG_HS256,
			.jwt_key = "fuzz-secret-0123456789abcdef",
			.jwt_key_len = 28,
			.issuer = "iss",
			.audience = "aud",
			.leeway_s = 30,
		};
		a = auth_new(&cfg, err, sizeof(err));
		if (!a)
			abort();
	}
	return a;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
	auth_principal p;

	memset(&p, 0, sizeof(p));
	if (auth_verify_jwt(verifier(), (const char *)data, size, 1700000000, &p) == AUTH_OK)
		__builtin_trap(); /* a forgery without the secret */
	auth_principal_clear(&p);
	if (auth_check_api_key(verifier(), (const char *)data, size, &p) == AUTH_OK)
		__builtin_trap(); /* no keys are configured */
	auth_principal_clear(&p);
	return 0;
}

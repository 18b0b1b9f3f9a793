/* Unit tests of the pure provenance code (hub/prov_core.h): the chain hash's
 * canonical encoding (a vector computed independently from
 * docs/provenance.md), the Merkle root and audit paths, Ed25519, and the
 * verifier's walk naming each kind of tampering. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <string.h>
#include <cmocka.h>

#include "hub/prov_core.h"

static void test_chain_hash_vector(void **state)
{
	static const uint8_t zero[32];
	struct prov_reading r = {
		"t-1", 3, "1700000000000", 13, "{\"temperature\":21.5}", 20, "gw-1", 4,
		7, 1700000000123, 1, "", 0,
	};
	uint8_t h[32];
	char hex[65];

	(void)state;
	prov_chain_hash(zero, &r, h);
	prov_hex(h, 32, hex);
	assert_string_equal(hex, "1704d88a4ced1daff52e3f49c165c290fd65a86e2463af1193c0c3355d750c09");
	/* every field counts */
	r.seq = 8;
	prov_chain_hash(zero, &r, h);
	prov_hex(h, 32, hex);
	assert_string_not_equal(hex, "1704d88a4ced1daff52e3f49c165c290fd65a86e2463af1193c0c3355d750c09");
}

static void test_merkle_vector_and_paths(void **state)
{
	struct prov_leaf l[3] = { { 1, "b", 3 }, { 0, "a", 1 }, { 0, "b", 2 } };
	uint8_t lh[9][32], root[32], path[64][32];
	char hex[65];

	(void)state;
	memset(l[0].head, 3, 32);
	memset(l[1].head, 1, 32);
	memset(l[2].head, 2, 32);
	prov_leaves_sort(l, 3);
	assert_string_equal(l[0].device, "a");
	assert_int_equal(l[2].shard, 1);
	for (int i = 0; i < 3; i++)
		prov_leaf_hash(&l[i], lh[i]);
	prov_merkle_root((const uint8_t (*)[32])lh, 3, root);
	prov_hex(root, 32, hex);
	assert_string_equal(hex, "1484525986a7d6d70475cecdc250250c8efe72586bbd19b9a36bca0c091d18b7");

	/* every leaf of every tree size 1..9 proves into its root, and not
	 * into another position */
	for (size_t n = 1; n <= 9; n++) {
		for (size_t i = 0; i < n; i++)
			memset(lh[i], (int)(i * 7 + n), 32);
		prov_merkle_root((const uint8_t (*)[32])lh, n, root);
		for (size_t i = 0; i < n; i++) {
			size_t np = prov_merkle_path((const uint8_t (*)[32])lh, n, i, path, 64);
			assert_true(prov_merkle_check(lh[i], i, n, (const uint8_t (*)[32])path, np, root));
			if (n > 1)
				assert_false(prov_merkle_check(lh[i], (i + 1) % n, n,
							       (const uint8_t (*)[32])path, np, root));
		}
	}
}

static void test_ed25519(void **state)
{
	uint8_t priv[32], pub[32], pub2[32], sig[64], msg[256];
	uint8_t root[32] = { 9 };
	size_t ml;

	(void)state;
	assert_int_equal(prov_ed25519_generate(priv, pub), 0);
	assert_int_equal(prov_ed25519_public(priv, pub2), 0);
	assert_memory_equal(pub, pub2, 32);
	ml = prov_checkpoint_message(5, 5000, 6000, 3, root, msg, sizeof(msg));
	assert_true(ml > 32 && ml < sizeof(msg));
	assert_int_equal(prov_ed25519_sign(priv, msg, ml, sig), 0);
	assert_true(prov_ed25519_verify(pub, msg, ml, sig));
	sig[10] ^= 1;
	assert_false(prov_ed25519_verify(pub, msg, ml, sig));
	/* the reading message: length-prefixed, so fields cannot slide */
	uint8_t a[128], b[128];
	size_t la = prov_reading_message("d1", 2, "12", 2, "{}", 2, a, sizeof(a));
	size_t lb = prov_reading_message("d", 1, "112", 3, "{}", 2, b, sizeof(b));
	assert_int_equal(la, lb);
	assert_memory_not_equal(a, b, la);
}

/* A chain of n entries as the hub writes it. */
static void make_chain(struct prov_entry *e, size_t n, int64_t n0)
{
	uint8_t prev[32] = { 0 };

	if (n0 > 1)
		memset(prev, 0x55, 32);
	for (size_t i = 0; i < n; i++) {
		memcpy(e[i].ph, prev, 32);
		e[i].n = n0 + (int64_t)i;
		memset(e[i].h, 0, 32);
		e[i].h[0] = (uint8_t)(i + 1);
		e[i].h[1] = (uint8_t)n0;
		memcpy(prev, e[i].h, 32);
	}
}

static void test_walk(void **state)
{
	struct prov_entry e[8], t[9];
	size_t at;

	(void)state;
	make_chain(e, 8, 1);
	assert_int_equal(prov_walk(e, 8, &at), PROV_OK);
	make_chain(e, 8, 100); /* a trimmed chain: the first kept entry is the anchor */
	assert_int_equal(prov_walk(e, 8, &at), PROV_OK);

	/* altered content of entry 3: its own hash changes */
	make_chain(e, 8, 1);
	e[3].h[5] = 0xee;
	assert_int_equal(prov_walk(e, 8, &at), PROV_ALTERED);
	assert_int_equal(at, 3);
	/* an entry's stored ph changed: it is named, not its predecessor */
	make_chain(e, 8, 1);
	e[5].ph[0] ^= 1;
	e[5].h[2] ^= 1; /* recomputed from the changed ph */
	assert_int_equal(prov_walk(e, 8, &at), PROV_ALTERED);
	assert_int_equal(at, 5);
	/* the one before the last altered (the last entry is checked against
	 * the stored head by the caller) */
	make_chain(e, 8, 1);
	e[6].h[9] = 1;
	assert_int_equal(prov_walk(e, 8, &at), PROV_ALTERED);
	assert_int_equal(at, 6);

	/* removed entry 4 */
	make_chain(t, 8, 1);
	memcpy(e, t, 4 * sizeof(*e));
	memcpy(e + 4, t + 5, 3 * sizeof(*e));
	assert_int_equal(prov_walk(e, 7, &at), PROV_REMOVED);
	assert_int_equal(at, 4);

	/* inserted after entry 2 */
	make_chain(e, 8, 1);
	memcpy(t, e, 3 * sizeof(*e));
	t[3] = e[2];
	t[3].h[7] = 0x42;
	memcpy(t + 4, e + 3, 5 * sizeof(*e));
	assert_int_equal(prov_walk(t, 9, &at), PROV_INSERTED);
	assert_int_equal(at, 3);

	/* 2 and 3 swapped */
	make_chain(e, 8, 1);
	t[0] = e[2];
	e[2] = e[3];
	e[3] = t[0];
	assert_int_equal(prov_walk(e, 8, &at), PROV_REORDERED);
	assert_int_equal(at, 2);

	/* a first reading that does not start from zero */
	make_chain(e, 8, 1);
	e[0].ph[0] = 1;
	assert_int_equal(prov_walk(e, 8, &at), PROV_BROKEN);
	assert_string_equal(prov_fault_name(PROV_REORDERED), "reordered");
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_chain_hash_vector),
		cmocka_unit_test(test_merkle_vector_and_paths),
		cmocka_unit_test(test_ed25519),
		cmocka_unit_test(test_walk),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}

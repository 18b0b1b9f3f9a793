/*
 * prov_core.h - the pure half of provenance (docs/provenance.md): the
 * canonical encodings that are hashed or signed, the chain hash of a stored
 * reading, the Merkle tree of a checkpoint (RFC 6962 shape), Ed25519 through
 * OpenSSL 3 EVP, and the chain walk the verifier runs (prov_walk). No lws, no
 * Redis: unit-tested alone (tests/unit/test_prov.c) and linked by hubctl.
 *
 * Every function is reentrant and allocates nothing the caller must free
 * unless it says so.
 */
#ifndef HUB_PROV_CORE_H
#define HUB_PROV_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PROV_HASH_LEN 32
#define PROV_HEX_LEN  64          /* a hash as lowercase hex */
#define PROV_SIG_LEN  64          /* an Ed25519 signature */
#define PROV_KEY_LEN  32          /* an Ed25519 public key */

/* One stored reading as the chain sees it (borrowed strings, not
 * NUL-terminated unless the caller makes them so). n is the reading's
 * position in its chain (1 = the first reading ever stored in that stream),
 * at the hub's arrival time (ms); sig the device's signature as stored
 * (128 hex digits) or empty. */
struct prov_reading {
	const char *device; size_t device_len;
	const char *ts; size_t ts_len;        /* decimal ms, as stored */
	const char *data; size_t data_len;    /* compact JSON, as stored */
	const char *gw; size_t gw_len;
	int64_t seq, at, n;
	const char *sig; size_t sig_len;
};

/* The chain hash of r after prev (32 bytes; all zero before the first
 * reading): SHA-256 of "iot-hub.prov.v1\0" then, each as a 4-byte
 * big-endian length and its bytes: prev (32 raw bytes), n, device, ts, data,
 * gw, seq, at (decimals), sig. Writes 32 bytes to out. */
void prov_chain_hash(const uint8_t prev[PROV_HASH_LEN], const struct prov_reading *r,
		     uint8_t out[PROV_HASH_LEN]);

/* What a device signs for one reading: "iot-hub.reading.v1\0", then device,
 * ts (decimal ms) and data (compact JSON), each length-prefixed as above.
 * Writes at most cap bytes to out; returns the length it needs. */
size_t prov_reading_message(const char *device, size_t dl, const char *ts, size_t tl,
			    const char *data, size_t datal, uint8_t *out, size_t cap);

/* Hex in lower case, NUL-terminated (hub_unhex in hub/util.h reads it back). */
void prov_hex(const uint8_t *in, size_t n, char *out /* 2n + 1 */);

/* ---- checkpoints: the Merkle tree ----------------------------------------
 * A leaf is one chain's head: its ingest shard, device, position n and
 * hash. Leaves are sorted by (device, shard) before the tree is built; the
 * tree is RFC 6962's (leaf hash SHA-256(0x00 || leaf), node SHA-256(0x01 ||
 * left || right), split at the largest power of two below the count). */
struct prov_leaf {
	unsigned shard;
	const char *device;   /* NUL-terminated, borrowed */
	int64_t n;
	uint8_t head[PROV_HASH_LEN];
};

/* The leaf's hash (the tree's level 0). */
void prov_leaf_hash(const struct prov_leaf *l, uint8_t out[PROV_HASH_LEN]);

/* Sorts leaves by (device, shard). */
void prov_leaves_sort(struct prov_leaf *l, size_t n);

/* The root of the tree over n leaf hashes (SHA-256 of nothing when n = 0). */
void prov_merkle_root(const uint8_t (*lh)[PROV_HASH_LEN], size_t n, uint8_t out[PROV_HASH_LEN]);

/* The audit path of leaf i of n (RFC 6962 PATH): fills at most cap hashes
 * of path and returns how many it has (at most 64). */
size_t prov_merkle_path(const uint8_t (*lh)[PROV_HASH_LEN], size_t n, size_t i,
			uint8_t (*path)[PROV_HASH_LEN], size_t cap);

/* True when leaf hash lh at index i of n with that path gives root. */
bool prov_merkle_check(const uint8_t lh[PROV_HASH_LEN], size_t i, size_t n,
		       const uint8_t (*path)[PROV_HASH_LEN], size_t npath,
		       const uint8_t root[PROV_HASH_LEN]);

/* What the hub signs for a checkpoint: "iot-hub.checkpoint.v1\0" then
 * period, from, to, count (decimals) and root (32 raw bytes), each
 * length-prefixed. Returns the length written (at most 160 bytes). */
size_t prov_checkpoint_message(int64_t period, int64_t from, int64_t to, int64_t count,
			       const uint8_t root[PROV_HASH_LEN], uint8_t *out, size_t cap);

/* ---- Ed25519 --------------------------------------------------------------- */

/* True when sig is pub's signature of msg. */
bool prov_ed25519_verify(const uint8_t pub[PROV_KEY_LEN], const uint8_t *msg, size_t len,
			 const uint8_t sig[PROV_SIG_LEN]);

/* Signs msg with the raw 32-byte private key (seed). 0 or -1. */
int prov_ed25519_sign(const uint8_t priv[32], const uint8_t *msg, size_t len,
		      uint8_t sig[PROV_SIG_LEN]);

/* A new key pair (raw seed and public key). 0 or -1. */
int prov_ed25519_generate(uint8_t priv[32], uint8_t pub[PROV_KEY_LEN]);

/* The public key of a raw seed. 0 or -1. */
int prov_ed25519_public(const uint8_t priv[32], uint8_t pub[PROV_KEY_LEN]);

/* ---- the verifier's walk ----------------------------------------------------
 * The entries of one chain (one device stream), in stream order, each with
 * the predecessor hash it stores (ph) and its own recomputed hash (h,
 * prov_chain_hash of ph and the entry). prov_walk finds the first place the
 * chain breaks and says what happened there:
 *   - altered:   entry i's stored content changed (the next entry's ph is not
 *                its hash, positions are consecutive);
 *   - removed:   entries are missing before i (position gap, ph unknown);
 *   - inserted:  entry i is not part of the chain (the next entry chains to
 *                the one before i);
 *   - reordered: entries i and i+1 swapped (i chains to i+1, i+1 to i-1);
 *   - broken:    none of these (ph and positions do not fit).
 * head (optional): the chain head Redis or a checkpoint records for the
 * last entry; a mismatch there is `altered` at the last entry.
 * Entry 0's ph is trusted (it is the anchor), unless its n is 1 (the
 * chain's first reading), when it must be all zero. */
struct prov_entry {
	uint8_t ph[PROV_HASH_LEN];
	uint8_t h[PROV_HASH_LEN];
	int64_t n;
};

enum prov_fault { PROV_OK, PROV_ALTERED, PROV_REMOVED, PROV_INSERTED, PROV_REORDERED,
		  PROV_BROKEN };

/* "ok", "altered", ... */
const char *prov_fault_name(enum prov_fault f);

/* Returns PROV_OK, or the fault with *at = the index (0-based) of the entry
 * it names. */
enum prov_fault prov_walk(const struct prov_entry *e, size_t n, size_t *at);

#endif

/*
 * keys.h - every Redis key and pub/sub channel name the hub uses, spelled in
 * one place, for C and for the Lua scripts (docs/streams.md "Key names").
 *
 * The rule: a user-chosen name inside a key (device, gateway, device type,
 * API key or token name, hub instance id) is wrapped in braces, `<prefix>{<name>}<suffix>`:
 * iot:dev:{kc-1}:cmds. Those names match [A-Za-z0-9._:-]{1,128} (hub_id_valid,
 * the schema loader, auth), so they never hold '{' or '}' and the first '}'
 * after the prefix ends the name: no two (name, suffix) pairs give the same
 * key, whatever ':' the names hold. Before (layout 1) the device `kc-1:cmds`
 * had the hash iot:dev:kc-1:cmds, which is device kc-1's command queue.
 * Names the hub generates itself (command and rollout ids: hex, no ':'; run
 * tokens: HUB_RUN_TOKEN_LEN hex digits) and the fixed names below stay
 * unbraced.
 *
 * The layout version is kept in HUB_LAYOUT_KEY: a hub refuses to run on data
 * of another layout (tools/migrate-layout converts layout 1).
 *
 * The C builders write into a caller buffer of n bytes (HUB_KEY_MAX holds the
 * longest key any valid id gives) and return the key's length, or 0 (buf set
 * to "") when the name is empty, longer than HUB_ID_MAX, or does not fit: a
 * name that long was never validated, so the caller treats 0 as an error.
 * Header only; no lws, no hiredis: usable anywhere, callbacks included.
 *
 * The Redis scripts (hub/lua/) build no name: every key they touch comes in
 * their KEYS, every channel they publish on in their ARGV, built here.
 */
#ifndef HUB_KEYS_H
#define HUB_KEYS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "hub/slot.h"
#include "hub/util.h"

/* The layout: set by the first hub on an empty Redis (main.c, hub/migrate.c).
 * Layout 3 (Redis Cluster): the fixed global control keys that are read
 * together (layout, epoch, leases, reaper claims, active rollouts, the slot
 * directory) share the hash tag {hub}: they are low-rate, one slot is fine. */
#define HUB_LAYOUT_KEY           "iot:{hub}:layout"
#define HUB_LAYOUT_VERSION       "3"

/* Fixed keys. */
#define HUB_KEY_FEED             "iot:feed"
#define HUB_KEY_AGG_PARTIALS     "iot:agg:partials"
#define HUB_KEY_LEASES           "iot:{hub}:leases"   /* run id -> lease expiry (ms) */
#define HUB_KEY_EPOCH            "iot:{hub}:epoch"    /* this Redis's data generation */
#define HUB_KEY_ROLLOUTS_ACTIVE  "iot:{hub}:rollouts" /* running rollout ids */
#define HUB_KEY_SLOTS            "iot:{hub}:slots"    /* bitmap: slots that hold devices */
#define HUB_KEY_SWEEP            "iot:{hub}:sweep"    /* run id of the hub sweeping command timers this second */
#define HUB_KEY_INGEST           "iot:ingest"         /* hash: shards (the feed-shards in use), migrated */
#define HUB_KEY_REAPER           "iot:{hub}:reaper:"  /* + run id: who reaps that run */
#define HUB_KEY_RUNSLOTS         "iot:{hub}:runslots:" /* + run id: bitmap of the slots of its run sets */

/* Slot-local indexes (layout 3): iot:idx:{<slot tag>}:<what>, in the slot
 * of the devices they index (hub_slot_tag), so that a device and its index
 * entries change in one script call. */
#define HUB_KEY_IDX              "iot:idx:"      /* {tag}:devices, :type:<type>, :timers, :run:<run> */

/* Prefixes of keys around a braced user-chosen name. */
#define HUB_KEY_DEV              "iot:dev:"      /* {device}, {device}:cmds, :cmdlog, :cancels */
#define HUB_KEY_TM               "iot:tm:"       /* {device} */
#define HUB_KEY_GW               "iot:gw:"       /* {gateway}:seqs, :epoch, :limits */
#define HUB_KEY_IDEM             "iot:idem:"     /* {owner}:<Idempotency-Key> */
#define HUB_KEY_INST             "iot:inst:"     /* {instance}:<run>: layout 2's run sets (migrated) */

/* Ingest shards (docs/streams.md "Ingest shards"): a gateway's frames go to
 * shard k = hub_ingest_shard_of(gateway, N); every key a frame touches
 * carries the shard's hash tag {i<k>}, the user-chosen name comes last,
 * after the tag (it is the whole rest of the key, so it needs no
 * delimiter): iot:tm:{i3}:kc-1, iot:seqs:{i3}:gw-1, iot:feed:{i3}. */
#define HUB_KEY_TM_SHARD         "iot:tm:"       /* {i<k>}:<device> */
#define HUB_KEY_SEQS             "iot:seqs:"     /* {i<k>}:<gateway> */
#define HUB_KEY_PROV_HEADS       "iot:ph:"       /* {i<k>}: stream key -> chain head (docs/provenance.md) */
#define HUB_KEY_PROV_DIRTY       "iot:pd:"       /* {i<k>}: streams whose head changed since the last checkpoint */
#define HUB_KEY_PROV_CKPTS       "iot:{hub}:prov:ckpts"  /* signed checkpoints (stream) */
#define HUB_KEY_PROV_CLAIM       "iot:{hub}:prov:claim:" /* + period: the instance writing it */
#define HUB_KEY_PROV_KEYS        "iot:{hub}:prov:keys"   /* every hub's checkpoint public key */
#define HUB_KEY_FEED_SHARD       "iot:feed:"     /* {i<k>} */
#define HUB_CH_LIVE              "iot:live:"     /* {i<k>}:raw:<type> (sharded, cluster) */
#define HUB_FEED_SHARDS_MAX      64

/* Prefixes of keys around a hub-generated id (braced: the id is the hash
 * tag; a command id is drawn in its device's slot, hub_slot_fit_id). */
#define HUB_KEY_CMD              "iot:cmd:"      /* {<id>}, {<id>}:log */
#define HUB_KEY_ROLLOUT          "iot:rollout:"  /* {<id>}, {<id>}:cmds */

/* Pub/sub channels: a fixed name, or a prefix plus one name. */
#define HUB_CH_RAW               "iot:live:raw:" /* + device type */
#define HUB_CH_PRESENCE          "iot:live:presence"
#define HUB_CH_COMMANDS          "iot:live:commands"
#define HUB_CH_AGG               "iot:live:agg"
#define HUB_CH_TAKEOVER          "iot:ctl:takeover"
#define HUB_CH_DEVTAKE           "iot:ctl:devtake:" /* devices taken: classic, every instance (below) */
#define HUB_CH_CTL_CMD           "iot:ctl:cmd:"  /* + {instance}: command work (sharded) */

/* A hub process's run token: this many lowercase hex digits, random per
 * process. Its run id is "<instance>:<token>", its connections are
 * "<instance>:<token>:<serial>", so a restarted instance with the same
 * instance id never shares a connection id with its dead predecessor. */
#define HUB_RUN_TOKEN_LEN        12

/* Longest key or channel built from one id: a run's slot-local set,
 * "iot:idx:{" + 6-digit tag + "}:run:" + 128 + ":" + token + NUL (163
 * bytes), with room to spare. */
#define HUB_KEY_MAX              (HUB_ID_MAX + 48)

/* <prefix>{<name>}<suffix> into buf (n bytes); see the top of this file. */
static inline size_t hub_key_braced(char *buf, size_t n, const char *prefix, size_t plen,
				    const char *name, const char *suffix, size_t slen)
{
	size_t len = strlen(name);

	if (!len || len > HUB_ID_MAX || plen + len + slen + 3 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, prefix, plen);
	buf[plen] = '{';
	memcpy(buf + plen + 1, name, len);
	buf[plen + 1 + len] = '}';
	memcpy(buf + plen + 2 + len, suffix, slen);
	buf[plen + 2 + len + slen] = '\0';
	return plen + 2 + len + slen;
}

#define HUB_KEY_BRACED_(buf, n, prefix, name, suffix) \
	hub_key_braced(buf, n, prefix, sizeof(prefix) - 1, name, suffix, sizeof(suffix) - 1)

/* iot:dev:{<device>}: the registry hash. */
static inline size_t hub_key_dev(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_DEV, device, "");
}

/* iot:dev:{<device>}:cancels: cancels owed to the device's gateway. */
static inline size_t hub_key_dev_cancels(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_DEV, device, ":cancels");
}

/* iot:dev:{<device>}:anom: the device's anomaly models, a field per marked
 * telemetry field (protocols/anomaly.c). */
static inline size_t hub_key_dev_anom(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_DEV, device, ":anom");
}

/* iot:tm:{<device>}: the device's telemetry stream in layout 2 (renamed to
 * hub_key_tm_shard by the 2 -> 3 migration). */
static inline size_t hub_key_tm(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_TM, device, "");
}

/* The ingest shard of a gateway among n (1..HUB_FEED_SHARDS_MAX): FNV-1a
 * (32 bits) of its id modulo n. Independent of Redis's slots, so it stays
 * put when slots move; every hub computes the same. */
static inline unsigned hub_ingest_shard_of(const char *gateway, unsigned n)
{
	uint32_t h = 2166136261u;

	for (const unsigned char *p = (const unsigned char *)gateway; *p; p++)
		h = (h ^ *p) * 16777619u;
	return n > 1 ? h % n : 0;
}

/* <prefix>{i<shard>}[:<name>][<suffix>] into buf: the shard-tagged keys
 * and channels. name may be NULL (the feed). 0 as hub_key_braced. */
static inline size_t hub_key_shard_(char *buf, size_t n, const char *prefix, unsigned shard,
				    const char *name, const char *suffix)
{
	size_t len = name ? strlen(name) : 0, plen = strlen(prefix), slen = strlen(suffix), k;

	if ((name && (!len || len > HUB_ID_MAX)) || shard >= HUB_FEED_SHARDS_MAX ||
	    plen + len + slen + 8 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	/* by hand: this runs per reading on the store path */
	memcpy(buf, prefix, plen);
	k = plen;
	buf[k++] = '{';
	buf[k++] = 'i';
	if (shard >= 10)
		buf[k++] = (char)('0' + shard / 10);
	buf[k++] = (char)('0' + shard % 10);
	buf[k++] = '}';
	if (name) {
		buf[k++] = ':';
		memcpy(buf + k, name, len);
		k += len;
	}
	memcpy(buf + k, suffix, slen + 1);
	return k + slen;
}

/* iot:tm:{i<shard>}:<device>: the device's readings stored through
 * gateways of that shard. */
static inline size_t hub_key_tm_shard(char *buf, size_t n, unsigned shard, const char *device)
{
	return hub_key_shard_(buf, n, HUB_KEY_TM_SHARD, shard, device, "");
}

/* iot:seqs:{i<shard>}:<gateway>: the gateway's window of stored seqs. */
static inline size_t hub_key_seqs(char *buf, size_t n, unsigned shard, const char *gateway)
{
	return hub_key_shard_(buf, n, HUB_KEY_SEQS, shard, gateway, "");
}

/* iot:feed:{i<shard>}: the shard's feed. */
static inline size_t hub_key_feed(char *buf, size_t n, unsigned shard)
{
	return hub_key_shard_(buf, n, HUB_KEY_FEED_SHARD, shard, NULL, "");
}

/* iot:live:{i<shard>}:raw:<type>: the sharded channel of a device type's
 * live readings of one shard (SPUBLISH, cluster mode). */
static inline size_t hub_ch_raw_shard(char *buf, size_t n, unsigned shard, const char *type)
{
	size_t len = strlen(type);

	if (!len || len > HUB_ID_MAX || shard >= HUB_FEED_SHARDS_MAX ||
	    sizeof(HUB_CH_LIVE) + len + 16 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	return (size_t)snprintf(buf, n, HUB_CH_LIVE "{i%u}:raw:%s", shard, type);
}

/* iot:gw:{<gateway>}:seqs: the gateway's window of stored seqs in layout 2
 * (renamed to hub_key_seqs by the 2 -> 3 migration). */
static inline size_t hub_key_gw_seqs(char *buf, size_t n, const char *gateway)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_GW, gateway, ":seqs");
}

/* iot:gw:{<gateway>}:epoch: the gateway's connection counter. */
static inline size_t hub_key_gw_epoch(char *buf, size_t n, const char *gateway)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_GW, gateway, ":epoch");
}

/* iot:gw:{<gateway>}:limits: the gateway's rate limits between
 * connections (hash of theoretical arrival times, ms). */
static inline size_t hub_key_gw_limits(char *buf, size_t n, const char *gateway)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_GW, gateway, ":limits");
}

/* iot:idx:{<tag of slot>}<suffix><name>: a slot-local index (name may be
 * "" for the fixed ones). 0 when it does not fit or name is longer than
 * max. */
static inline size_t hub_key_idx_n_(char *buf, size_t n, unsigned slot, const char *suffix,
				    const char *name, size_t max)
{
	char tag[HUB_SLOT_TAG_MAX];
	size_t plen = sizeof(HUB_KEY_IDX) - 1, tlen = hub_slot_tag(slot, tag);
	size_t slen = strlen(suffix), nlen = strlen(name), k = plen + tlen + 2 + slen + nlen;

	if (nlen > max || k + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, HUB_KEY_IDX, plen);
	buf[plen] = '{';
	memcpy(buf + plen + 1, tag, tlen);
	buf[plen + 1 + tlen] = '}';
	memcpy(buf + plen + 2 + tlen, suffix, slen);
	memcpy(buf + plen + 2 + tlen + slen, name, nlen + 1);
	return k;
}

static inline size_t hub_key_idx_(char *buf, size_t n, unsigned slot, const char *suffix,
				  const char *name)
{
	return hub_key_idx_n_(buf, n, slot, suffix, name, HUB_ID_MAX);
}

/* The slot of a device's keys (iot:dev:{<device>}, ...): of its id. */
static inline unsigned hub_dev_slot(const char *device)
{
	return hub_crc16(device, strlen(device)) & (HUB_SLOTS - 1);
}

/* iot:idx:{<tag>}:devices: the devices of slot (every device ever announced
 * lives in the index of its own slot). */
static inline size_t hub_key_idx_devices(char *buf, size_t n, unsigned slot)
{
	return hub_key_idx_(buf, n, slot, ":devices", "");
}

/* iot:idx:{<tag>}:type:<type>: the devices of slot of a type. The type is
 * the last part: no delimiter needed. */
static inline size_t hub_key_idx_type(char *buf, size_t n, unsigned slot, const char *type)
{
	if (!*type) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	return hub_key_idx_(buf, n, slot, ":type:", type);
}

/* iot:idx:{<tag>}:timers: command id -> next deadline, for the commands of
 * the devices of slot. */
static inline size_t hub_key_idx_timers(char *buf, size_t n, unsigned slot)
{
	return hub_key_idx_(buf, n, slot, ":timers", "");
}

/* <prefix><name> (channels, hub-generated ids): as hub_key_braced. */
static inline size_t hub_key_plain(char *buf, size_t n, const char *prefix, size_t plen,
				   const char *name)
{
	size_t len = strlen(name);

	if (!len || len > HUB_ID_MAX || plen + len + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, prefix, plen);
	memcpy(buf + plen, name, len + 1);
	return plen + len;
}

/* iot:live:raw:<type>: live readings of a device type. */
static inline size_t hub_ch_raw(char *buf, size_t n, const char *type)
{
	return hub_key_plain(buf, n, HUB_CH_RAW, sizeof(HUB_CH_RAW) - 1, type);
}

/* iot:ctl:cmd:{<instance>}: command work routed to an instance (a sharded
 * channel: SPUBLISH reaches the one primary of the instance's slot). */
static inline size_t hub_ch_ctl_cmd(char *buf, size_t n, const char *instance)
{
	return HUB_KEY_BRACED_(buf, n, HUB_CH_CTL_CMD, instance, "");
}

/* iot:ctl:devtake:{<instance>}: devices of that instance's connections
 * taken by another connection, as a sharded channel per instance. Not used
 * yet: announce publishes every takeover on the one classic channel
 * HUB_CH_DEVTAKE (as such, with its trailing ':'), which every instance
 * subscribes to; the per-instance form needs announce split per owner. */
static inline size_t hub_ch_devtake(char *buf, size_t n, const char *instance)
{
	return HUB_KEY_BRACED_(buf, n, HUB_CH_DEVTAKE, instance, "");
}

/* <prefix><name><suffix> (hub-generated ids): as hub_key_braced, unbraced. */
static inline size_t hub_key_plain_sfx(char *buf, size_t n, const char *prefix, size_t plen,
				       const char *name, const char *suffix, size_t slen)
{
	size_t len = strlen(name);

	if (!len || len > HUB_ID_MAX || plen + len + slen + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, prefix, plen);
	memcpy(buf + plen, name, len);
	memcpy(buf + plen + len, suffix, slen + 1);
	return plen + len + slen;
}

/* iot:dev:{<device>}:cmds: the device's pending commands (id by creation seq). */
static inline size_t hub_key_dev_cmds(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_DEV, device, ":cmds");
}

/* iot:dev:{<device>}:cmdlog: the device's last commands, any state. */
static inline size_t hub_key_dev_cmdlog(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_DEV, device, ":cmdlog");
}

/* iot:cmd:{<id>}: a command's hash (the id is drawn in its device's slot). */
static inline size_t hub_key_cmd(char *buf, size_t n, const char *id)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_CMD, id, "");
}

/* iot:cmd:{<id>}:log: a command's history. */
static inline size_t hub_key_cmd_log(char *buf, size_t n, const char *id)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_CMD, id, ":log");
}

/* iot:rollout:{<id>}: a rollout's hash. */
static inline size_t hub_key_rollout(char *buf, size_t n, const char *id)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_ROLLOUT, id, "");
}

/* iot:rollout:{<id>}:cmds: a rollout's command ids, in release order. */
static inline size_t hub_key_rollout_cmds(char *buf, size_t n, const char *id)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_ROLLOUT, id, ":cmds");
}

/* Longest idempotency key: "iot:idem:{" + device + "}:{" + owner + "}:" +
 * key + NUL, each at most HUB_ID_MAX bytes. */
#define HUB_KEY_IDEM_MAX         (3 * HUB_ID_MAX + 24)

/* iot:idem:{<device>}:{<owner>}:<key>: the first command created for the
 * device with an Idempotency-Key (in the device's slot, beside the
 * command it names); buf holds HUB_KEY_IDEM_MAX. The owner may be empty (a
 * token without a subject): {}. */
static inline size_t hub_key_idem(char *buf, size_t n, const char *device, const char *owner,
				  const char *key)
{
	size_t dlen = strlen(device), olen = strlen(owner), len = strlen(key);
	size_t plen = sizeof(HUB_KEY_IDEM) - 1, k = plen + dlen + 6 + olen + len;

	if (!dlen || dlen > HUB_ID_MAX || !len || len > HUB_ID_MAX || olen > HUB_ID_MAX ||
	    k + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, HUB_KEY_IDEM, plen);
	buf[plen] = '{';
	memcpy(buf + plen + 1, device, dlen);
	memcpy(buf + plen + 1 + dlen, "}:{", 3);
	memcpy(buf + plen + 4 + dlen, owner, olen);
	memcpy(buf + plen + 4 + dlen + olen, "}:", 2);
	memcpy(buf + plen + 6 + dlen + olen, key, len + 1);
	return k;
}

/* Length of the instance part of a run id "<instance>:<token>" (token:
 * HUB_RUN_TOKEN_LEN lowercase hex digits), or 0 when run is not one. */
static inline size_t hub_run_instance_len(const char *run, size_t len)
{
	if (len < HUB_RUN_TOKEN_LEN + 2 || len - HUB_RUN_TOKEN_LEN - 1 > HUB_ID_MAX ||
	    run[len - HUB_RUN_TOKEN_LEN - 1] != ':')
		return 0;
	for (size_t i = len - HUB_RUN_TOKEN_LEN; i < len; i++)
		if (!((run[i] >= '0' && run[i] <= '9') || (run[i] >= 'a' && run[i] <= 'f')))
			return 0;
	return len - HUB_RUN_TOKEN_LEN - 1;
}

/* The run id of a connection id "<run id>:<serial>" (decimal serial) into
 * buf (n bytes); its length, or 0 (buf "") when conn is not of that shape
 * (layout-2 data written before runs existed). */
static inline size_t hub_run_of_conn(char *buf, size_t n, const char *conn)
{
	size_t len = strlen(conn), i = len;

	while (i && conn[i - 1] >= '0' && conn[i - 1] <= '9')
		i--;
	if (i == len || i < 2 || conn[i - 1] != ':' || !hub_run_instance_len(conn, i - 1) ||
	    i > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, conn, i - 1);
	buf[i - 1] = '\0';
	return i - 1;
}

/* iot:inst:{<instance>}:<token><suffix> from a run id: the run's set of
 * online devices (suffix ""), or the claim of the instance reaping it
 * (":reaper"). 0 when run is not a run id. */
static inline size_t hub_key_run_(char *buf, size_t n, const char *run, const char *suffix,
				  size_t slen)
{
	size_t len = strlen(run), ilen = hub_run_instance_len(run, len);
	size_t plen = sizeof(HUB_KEY_INST) - 1, k = plen + ilen + 3 + HUB_RUN_TOKEN_LEN + slen;

	if (!ilen || k + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, HUB_KEY_INST, plen);
	buf[plen] = '{';
	memcpy(buf + plen + 1, run, ilen);
	buf[plen + 1 + ilen] = '}';
	memcpy(buf + plen + 2 + ilen, run + ilen, HUB_RUN_TOKEN_LEN + 1); /* ":<token>" */
	memcpy(buf + plen + 3 + ilen + HUB_RUN_TOKEN_LEN, suffix, slen + 1);
	return k;
}

/* iot:inst:{<instance>}:<token>: layout 2's set of the devices a run held
 * online (the 2 -> 3 migration moves it to the slot-local run sets). */
static inline size_t hub_key_run(char *buf, size_t n, const char *run)
{
	return hub_key_run_(buf, n, run, "", 0);
}

/* iot:{hub}:reaper:<instance>:<token>: which run reaps this (dead) run:
 * beside the leases, so that claiming checks the lease in one call. */
static inline size_t hub_key_run_reaper(char *buf, size_t n, const char *run)
{
	size_t len = strlen(run), plen = sizeof(HUB_KEY_REAPER) - 1;

	if (!hub_run_instance_len(run, len) || plen + len + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, HUB_KEY_REAPER, plen);
	memcpy(buf + plen, run, len + 1);
	return plen + len;
}

/* iot:idx:{<tag of slot>}:run:<instance>:<token>: the devices of slot that
 * run holds online (slot-local: a device, its registry hash and its entry
 * here change in one script call). The run id is the last part: no
 * delimiter needed. 0 when run is not a run id. */
static inline size_t hub_key_idx_run(char *buf, size_t n, unsigned slot, const char *run)
{
	if (!hub_run_instance_len(run, strlen(run))) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	return hub_key_idx_n_(buf, n, slot, ":run:", run, HUB_ID_MAX + 1 + HUB_RUN_TOKEN_LEN);
}

/* iot:{hub}:runslots:<instance>:<token>: bitmap, bit s set (before the
 * run's first write there) once the run's set of slot s may hold a device:
 * the slots a reaper or the run's release walks. Beside the lease. */
static inline size_t hub_key_runslots(char *buf, size_t n, const char *run)
{
	size_t len = strlen(run), plen = sizeof(HUB_KEY_RUNSLOTS) - 1;

	if (!hub_run_instance_len(run, len) || plen + len + 1 > n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	memcpy(buf, HUB_KEY_RUNSLOTS, plen);
	memcpy(buf + plen, run, len + 1);
	return plen + len;
}

/* Operations (hub/audit.c, hub/revoke.c): low-rate keys of their own slot. */
#define HUB_KEY_AUDIT            "iot:{ops}:audit"       /* stream of operator actions */
#define HUB_KEY_REVOKED          "iot:{ops}:revoked"     /* "sub:<gateway>"/"jti:<id>" -> JSON */
#define HUB_CH_REVOKED           "iot:{ops}:revocations" /* "add|lift <kind>:<value>" */

/* Rollups and the analytics API (hub/rollup.c, hub/analytics.c,
 * docs/analytics.md). Rollup keys carry the hash tag {i<k>} of rollup shard
 * k = hub_ingest_shard_of(<device>, N) (N: the ingest shards), so one
 * script call touches one slot; a query reads every shard and merges. */
#define HUB_KEY_RU               "iot:ru:"       /* {i<k>}:applied, :devs, :<g>:<start> */
#define HUB_KEY_AQ               "iot:aq:"       /* {<query hash>}, {<query hash>}:lock */
#define HUB_KEY_TIER             "iot:tier:"     /* {<API key name>} */

/* iot:ru:{i<k>}:applied: the flush ids merged lately (zset). */
static inline size_t hub_key_ru_applied(char *buf, size_t n, unsigned shard)
{
	return hub_key_shard_(buf, n, HUB_KEY_RU, shard, "applied", "");
}

/* iot:ru:{i<k>}:devs: device -> "<type>\t<labels JSON>" of the devices
 * with rollups in the shard. */
static inline size_t hub_key_ru_devs(char *buf, size_t n, unsigned shard)
{
	return hub_key_shard_(buf, n, HUB_KEY_RU, shard, "devs", "");
}

/* iot:ru:{i<k>}:<g>:<start ms>: the bucket of granularity g ("1m", "1h",
 * "1d") starting at start: field "<device>|<field>" -> partial. */
static inline size_t hub_key_ru_bucket(char *buf, size_t n, unsigned shard, const char *g,
				       int64_t start)
{
	char name[48];

	snprintf(name, sizeof(name), "%s:%lld", g, (long long)start);
	return hub_key_shard_(buf, n, HUB_KEY_RU, shard, name, "");
}

/* iot:aq:{<hash>}: a cached analytics answer; iot:aq:{<hash>}:lock: its
 * single-flight lock (hash: hex digest of the normalized query). */
static inline size_t hub_key_aq(char *buf, size_t n, const char *hash)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_AQ, hash, "");
}

static inline size_t hub_key_aq_lock(char *buf, size_t n, const char *hash)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_AQ, hash, ":lock");
}

/* iot:tier:{<key name>}: an API key's request count in its tier window. */
static inline size_t hub_key_tier(char *buf, size_t n, const char *key_name)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_TIER, key_name, "");
}

/* Command transition counts per minute (commands/cmd_stats.c,
 * docs/commands.md "Commands by state"): a hash per minute, field "<state>"
 * or "<device type>|<state>" -> count, expiring after ~65 min. One slot
 * (the tag {cstats}): a window of 60 minutes is read in one call. */
#define HUB_KEY_CSTATS           "iot:{cstats}:m:"  /* + minute start (ms) */

static inline size_t hub_key_cstats(char *buf, size_t n, int64_t minute_ms)
{
	int k = snprintf(buf, n, HUB_KEY_CSTATS "%lld", (long long)minute_ms);

	if (k < 0 || (size_t)k >= n) {
		if (n)
			buf[0] = '\0';
		return 0;
	}
	return (size_t)k;
}

#endif

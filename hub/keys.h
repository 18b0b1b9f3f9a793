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
 */
#ifndef HUB_KEYS_H
#define HUB_KEYS_H

#include <stddef.h>
#include <string.h>

#include "hub/util.h"

/* The layout: SET NX by every hub once connected (main.c). */
#define HUB_LAYOUT_KEY           "iot:layout"
#define HUB_LAYOUT_VERSION       "2"

/* Fixed keys. */
#define HUB_KEY_FEED             "iot:feed"
#define HUB_KEY_DEVICES          "iot:devices"
#define HUB_KEY_CMD_TIMERS       "iot:cmd:timers"
#define HUB_KEY_CMD_SEQ          "iot:cmd:seq"
#define HUB_KEY_ROLLOUTS_ACTIVE  "iot:rollouts:active"
#define HUB_KEY_AGG_PARTIALS     "iot:agg:partials"
#define HUB_KEY_LEASES           "iot:leases"    /* run id -> lease expiry (ms) */
#define HUB_KEY_EPOCH            "iot:epoch"     /* this Redis's data generation */

/* Prefixes of keys around a braced user-chosen name. */
#define HUB_KEY_DEV              "iot:dev:"      /* {device}, {device}:cmds, :cmdlog, :cancels */
#define HUB_KEY_TM               "iot:tm:"       /* {device} */
#define HUB_KEY_GW               "iot:gw:"       /* {gateway}:seqs, :epoch, :limits */
#define HUB_KEY_TYPE             "iot:type:"     /* {device type} */
#define HUB_KEY_IDEM             "iot:idem:"     /* {owner}:<Idempotency-Key> */
#define HUB_KEY_INST             "iot:inst:"     /* {instance}:<run>, :<run>:reaper */

/* Prefixes of keys around a hub-generated id (never holds ':'). */
#define HUB_KEY_CMD              "iot:cmd:"      /* <id>, <id>:log */
#define HUB_KEY_ROLLOUT          "iot:rollout:"  /* <id>, <id>:cmds */

/* Pub/sub channels: a fixed name, or a prefix plus one name. */
#define HUB_CH_RAW               "iot:live:raw:" /* + device type */
#define HUB_CH_PRESENCE          "iot:live:presence"
#define HUB_CH_COMMANDS          "iot:live:commands"
#define HUB_CH_AGG               "iot:live:agg"
#define HUB_CH_TAKEOVER          "iot:ctl:takeover"
#define HUB_CH_DEVTAKE           "iot:ctl:devtake"   /* devices that changed connection */
#define HUB_CH_CTL_CMD           "iot:ctl:cmd:"  /* + instance id */

/* A hub process's run token: this many lowercase hex digits, random per
 * process. Its run id is "<instance>:<token>", its connections are
 * "<instance>:<token>:<serial>", so a restarted instance with the same
 * instance id never shares a connection id with its dead predecessor. */
#define HUB_RUN_TOKEN_LEN        12

/* Longest key or channel built from one id: "iot:dev:{" + 128 + "}:cancels"
 * + NUL (147 bytes). */
#define HUB_KEY_MAX              (HUB_ID_MAX + 32)

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

/* iot:tm:{<device>}: the device's telemetry stream. */
static inline size_t hub_key_tm(char *buf, size_t n, const char *device)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_TM, device, "");
}

/* iot:gw:{<gateway>}:seqs: the gateway's window of stored seqs. */
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

/* iot:type:{<type>}: the devices of a type. */
static inline size_t hub_key_type(char *buf, size_t n, const char *type)
{
	return HUB_KEY_BRACED_(buf, n, HUB_KEY_TYPE, type, "");
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

/* iot:ctl:cmd:<instance>: command work routed to an instance. */
static inline size_t hub_ch_ctl_cmd(char *buf, size_t n, const char *instance)
{
	return hub_key_plain(buf, n, HUB_CH_CTL_CMD, sizeof(HUB_CH_CTL_CMD) - 1, instance);
}

/* ---- the same names in Lua --------------------------------------------------
 * One local function per name, spelled from the prefixes above; a script
 * starts with the ones it uses (each is a closure made per call). The store
 * script (hub/registry.c), which builds a telemetry key per reading, splices
 * HUB_KEY_TM and HUB_CH_RAW in place instead. Ids reach the scripts validated
 * (the C side checks them first). */
#define HUB_LUA_KDEV \
	"local function kdev(d) return '" HUB_KEY_DEV "{' .. d .. '}' end\n"
#define HUB_LUA_KCMDS \
	"local function kcmds(d) return '" HUB_KEY_DEV "{' .. d .. '}:cmds' end\n"
#define HUB_LUA_KCMDLOG \
	"local function kcmdlog(d) return '" HUB_KEY_DEV "{' .. d .. '}:cmdlog' end\n"
#define HUB_LUA_KCANCELS \
	"local function kcancels(d) return '" HUB_KEY_DEV "{' .. d .. '}:cancels' end\n"
#define HUB_LUA_KGW \
	"local function kgw(g, suffix) return '" HUB_KEY_GW "{' .. g .. '}' .. suffix end\n"
#define HUB_LUA_KTYPE \
	"local function ktype(t) return '" HUB_KEY_TYPE "{' .. t .. '}' end\n"
#define HUB_LUA_KIDEM \
	"local function kidem(owner, key) return '" HUB_KEY_IDEM "{' .. owner .. '}:' .. key end\n"
#define HUB_LUA_KCMD \
	"local function kcmd(id) return '" HUB_KEY_CMD "' .. id end\n" \
	"local function kcmdhist(id) return '" HUB_KEY_CMD "' .. id .. ':log' end\n"
#define HUB_LUA_KROLLOUT \
	"local function krollout(id) return '" HUB_KEY_ROLLOUT "' .. id end\n" \
	"local function krolloutcmds(id) return '" HUB_KEY_ROLLOUT "' .. id .. ':cmds' end\n"
/* A run's keys from its run id "<instance>:<token>" (docs/streams.md
 * "Instance leases"): krun(r) is the set of devices the run holds online,
 * kreaper(r) the claim of the instance reaping it. runof(conn) is the run id
 * of a connection id "<run id>:<serial>", or nil for a connection id of
 * another shape (layout-2 data written before runs existed). */
#define HUB_LUA_KRUN \
	"local TOKEN_LEN = " HUB_KEYS_STR(HUB_RUN_TOKEN_LEN) "\n" \
	"local function krun(r)\n" \
	"  return '" HUB_KEY_INST "{' .. string.sub(r, 1, -TOKEN_LEN - 2) .. '}:' ..\n" \
	"    string.sub(r, -TOKEN_LEN)\n" \
	"end\n" \
	"local function kreaper(r) return krun(r) .. ':reaper' end\n" \
	"local function runof(conn)\n" \
	"  return string.match(conn or '', '^(.+:' .. string.rep('%x', TOKEN_LEN) .. '):%d+$')\n" \
	"end\n"
#define HUB_KEYS_STR_(x) #x
#define HUB_KEYS_STR(x) HUB_KEYS_STR_(x)

/* Fixed names as Lua locals. */
#define HUB_LUA_FIXED \
	"local K_DEVICES, K_TIMERS, K_CMDSEQ = '" HUB_KEY_DEVICES "', '" HUB_KEY_CMD_TIMERS "', '" \
	HUB_KEY_CMD_SEQ "'\n" \
	"local K_ROLLOUTS, CH_PRESENCE, CH_COMMANDS = '" HUB_KEY_ROLLOUTS_ACTIVE "', '" \
	HUB_CH_PRESENCE "', '" HUB_CH_COMMANDS "'\n" \
	"local K_LEASES, K_EPOCH = '" HUB_KEY_LEASES "', '" HUB_KEY_EPOCH "'\n"

/* Every helper (the command scripts' prelude). */
#define HUB_LUA_KEYS \
	HUB_LUA_KDEV HUB_LUA_KCMDS HUB_LUA_KCMDLOG HUB_LUA_KCANCELS HUB_LUA_KTYPE \
	HUB_LUA_KIDEM HUB_LUA_KCMD HUB_LUA_KROLLOUT HUB_LUA_FIXED

#endif

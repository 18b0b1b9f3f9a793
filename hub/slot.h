/*
 * slot.h - Redis Cluster hash slots, and which key of a command decides
 * where it goes (docs/streams.md "Redis Cluster").
 *
 * A key's slot is CRC16 (XMODEM: polynomial 0x1021, initial value 0) of the
 * key modulo 16384, exactly as Redis's CLUSTER KEYSLOT: when the key holds a
 * '{' followed later by a '}' with at least one byte between them, only the
 * bytes between the first '{' and the first '}' after it are hashed (the
 * hash tag); otherwise the whole key. So iot:dev:{kc-1} and
 * iot:dev:{kc-1}:cmds share a slot; "{}" and "a{}b" are hashed whole.
 *
 * Pure: no lws, no hiredis (in hubpure, unit-tested in tests/unit/test_slot.c).
 */
#ifndef HUB_SLOT_H
#define HUB_SLOT_H

#include <stdbool.h>
#include <stddef.h>

#define HUB_SLOTS 16384

/* The slot of key (len bytes, any bytes), 0..HUB_SLOTS-1. */
unsigned hub_slot(const char *key, size_t len);

/* CRC16/XMODEM of len bytes (hub_slot without the hash tag rule). */
unsigned hub_crc16(const char *p, size_t len);

/* The key a command is routed by, for commands the hub sends: EVAL,
 * EVALSHA (and their _RO forms, FCALL): KEYS[1], or none when numkeys is 0;
 * XREAD / XREADGROUP: the first stream after STREAMS; commands that take no
 * key (PING, INFO, SCRIPT, CLUSTER, CONFIG, WAIT, PUBLISH, AUTH, SELECT,
 * ECHO, TIME, ASKING, READONLY, CLIENT, COMMAND, DBSIZE, MULTI, EXEC,
 * HELLO): none; anything else: its first argument. argvlen may be NULL
 * (NUL-terminated arguments). Returns true and sets *key / *klen (pointing
 * into argv), or false for a keyless command. */
bool hub_cmd_key(int argc, const char *const *argv, const size_t *argvlen,
		 const char **key, size_t *klen);

/* As hub_cmd_key, for a command in RESP form (an array of bulk strings,
 * as hub_resp_head/hub_resp_arg write it): false also when cmd is not
 * well-formed. Reads at most the first arguments it needs (all of them for
 * XREAD), nothing is allocated. */
bool hub_resp_cmd_key(const char *cmd, size_t len, const char **key, size_t *klen);

/* A cluster redirection error: "MOVED <slot> <host>:<port>" or
 * "ASK <slot> <host>:<port>" (len bytes; host may be an IPv6 address, or
 * empty when the node does not know its endpoint: the caller then uses the
 * host it asked). Returns 1 for MOVED, 2 for ASK (with *slot, host,
 * *port set), 0 for anything else. */
int hub_parse_redirect(const char *err, size_t len, int *slot, char *host, size_t hostlen,
		       int *port);

/* Slot tags (key layout 3, docs/streams.md "Key names"): the tag of slot s
 * is the smallest decimal number whose digits hash to s, so a key
 * "<prefix>{<tag>}<suffix>" lives in slot s: a device's slot-local index
 * entries sit in the device's own slot. Writes it (NUL-terminated, at most
 * 6 digits) into out and returns its length. */
#define HUB_SLOT_TAG_MAX 8
size_t hub_slot_tag(unsigned slot, char out[HUB_SLOT_TAG_MAX]);

/* Rewrites the last 4 bytes of id (len bytes, len >= 4) as lowercase hex
 * digits so that the whole id hashes to slot (hub_crc16(id) % 16384 ==
 * slot): a command id whose hash tag shares its device's slot. False (id
 * unchanged) when no 4 hex digits do (about 2% of prefixes): the caller
 * draws another prefix. */
bool hub_slot_fit_id(char *id, size_t len, unsigned slot);

#endif

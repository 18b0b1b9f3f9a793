/*
 * pgw.h - the sink's PostgreSQL side (libpq, blocking): the readings table
 * (created if missing: daily range partitions, or a TimescaleDB hypertable
 * when that extension is installed in the database) and the write of one
 * batch in one transaction:
 *
 *   COPY the rows into a temporary staging table, then
 *   INSERT INTO <table> SELECT ... FROM staging ON CONFLICT DO NOTHING
 *
 * on the key (gateway, seq, idx, ts), so writing the same batch twice (a
 * crash after the commit and before the XACK) adds nothing. The insert
 * mode writes one INSERT ... ON CONFLICT DO NOTHING per row instead (the
 * benchmark's comparison; same transaction, same result).
 */
#ifndef SINK_PGW_H
#define SINK_PGW_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct sink_batch;
struct pgw;

/* table: [a-z_][a-z0-9_]{0,40} (checked by the caller). Not connected. */
struct pgw *pgw_new(const char *conninfo, const char *table, int ahead_days, bool insert_mode);
void pgw_free(struct pgw *w);

/* Connects (again) and makes sure the table exists. 0, or -1 (pgw_error). */
int pgw_connect(struct pgw *w);
bool pgw_connected(const struct pgw *w);

/* Writes b's rows in one transaction. 0 with *inserted (rows new to the
 * table; the rest were there already), or -1: nothing was written (the
 * transaction rolled back; a broken connection is closed, pgw_connect
 * opens it again). Creates the daily partitions b needs first. */
int pgw_write(struct pgw *w, const struct sink_batch *b, long long *inserted);

/* "partitioned" or "timescaledb" once connected. */
const char *pgw_kind(const struct pgw *w);
const char *pgw_error(const struct pgw *w);

#endif

/*
 * pgw.c - the sink's PostgreSQL side (pgw.h).
 */
#include "sink/pgw.h"

#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <libpq-fe.h>

#include "sink/batch.h"

#define DAYS_MAX       4096      /* partitions remembered as present */
#define DAY_MS         86400000LL
#define PAST_DAYS      3660      /* older readings go to the default partition */
#define FUTURE_DAYS    366
#define NFIELDS        9         /* a COPY row: sink/batch.h */
#define SCHEMA_LOCK    "7309113117"  /* pg_advisory_lock key of the schema setup */

struct pgw {
	char *conninfo;
	char table[48];
	int ahead;
	bool insert_mode;
	bool timescale;
	PGconn *conn;
	long long days[DAYS_MAX]; /* days (since 1970-01-01 UTC) with a partition */
	size_t ndays;
	char err[512];
};

static void set_err(struct pgw *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_err(struct pgw *w, const char *fmt, ...)
{
	va_list ap;
	size_t n;

	va_start(ap, fmt);
	vsnprintf(w->err, sizeof(w->err), fmt, ap);
	va_end(ap);
	n = strlen(w->err);
	while (n && (w->err[n - 1] == '\n' || w->err[n - 1] == ' '))
		w->err[--n] = '\0';
}

const char *pgw_error(const struct pgw *w)
{
	return w->err;
}

const char *pgw_kind(const struct pgw *w)
{
	return w->timescale ? "timescaledb" : "partitioned";
}

bool pgw_connected(const struct pgw *w)
{
	return w->conn && PQstatus(w->conn) == CONNECTION_OK;
}

struct pgw *pgw_new(const char *conninfo, const char *table, int ahead_days, bool insert_mode)
{
	struct pgw *w = calloc(1, sizeof(*w));

	if (!w || !(w->conninfo = strdup(conninfo)))
		abort();
	snprintf(w->table, sizeof(w->table), "%s", table);
	w->ahead = ahead_days;
	w->insert_mode = insert_mode;
	return w;
}

static void disconnect(struct pgw *w)
{
	if (w->conn)
		PQfinish(w->conn);
	w->conn = NULL;
}

void pgw_free(struct pgw *w)
{
	if (!w)
		return;
	disconnect(w);
	free(w->conninfo);
	free(w);
}

/* Runs sql; 0 when it succeeded (any result status but an error), -1 with
 * err set ("what: message"). The result is freed unless out takes it. */
static int run(struct pgw *w, const char *what, const char *sql, PGresult **out)
{
	PGresult *r = PQexec(w->conn, sql);
	ExecStatusType st = PQresultStatus(r);

	if (st != PGRES_COMMAND_OK && st != PGRES_TUPLES_OK && st != PGRES_COPY_IN) {
		set_err(w, "%s: %s", what, r ? PQresultErrorMessage(r) : PQerrorMessage(w->conn));
		PQclear(r);
		return -1;
	}
	if (out)
		*out = r;
	else
		PQclear(r);
	return 0;
}

/* The first value of a one-row query, into buf ("" for no row). */
static int query1(struct pgw *w, const char *what, const char *sql, char *buf, size_t n)
{
	PGresult *r;

	if (run(w, what, sql, &r))
		return -1;
	snprintf(buf, n, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "");
	PQclear(r);
	return 0;
}

static void day_name(long long day, char *ymd, size_t n, char *iso, size_t m)
{
	time_t t = (time_t)(day * 86400);
	struct tm tm;

	gmtime_r(&t, &tm);
	strftime(ymd, n, "%Y%m%d", &tm);
	strftime(iso, m, "%Y-%m-%d 00:00:00+00", &tm);
}

static bool day_known(const struct pgw *w, long long day)
{
	for (size_t i = 0; i < w->ndays; i++)
		if (w->days[i] == day)
			return true;
	return false;
}

static void day_remember(struct pgw *w, long long day)
{
	if (w->ndays == DAYS_MAX) {
		memmove(w->days, w->days + DAYS_MAX / 2, (DAYS_MAX / 2) * sizeof(w->days[0]));
		w->ndays = DAYS_MAX / 2;
	}
	w->days[w->ndays++] = day;
}

/* The partition of day, created when missing (outside any transaction).
 * 0, or -1 only when the connection broke: a partition that cannot be
 * created (a default partition holding rows of that day) is logged and its
 * rows go to the default partition. */
static int day_ensure(struct pgw *w, long long day)
{
	char ymd[16], from[40], to[40], name[80], sql[512], got[8];

	if (w->timescale || day_known(w, day))
		return 0;
	day_name(day, ymd, sizeof(ymd), from, sizeof(from));
	day_name(day + 1, name, sizeof(name), to, sizeof(to));
	snprintf(name, sizeof(name), "%s_p%s", w->table, ymd);
	snprintf(sql, sizeof(sql), "CREATE TABLE IF NOT EXISTS %s PARTITION OF %s FOR VALUES "
		 "FROM ('%s') TO ('%s')", name, w->table, from, to);
	if (run(w, "creating a partition", sql, NULL)) {
		if (PQstatus(w->conn) != CONNECTION_OK)
			return -1;
		/* another sink may have created it meanwhile */
		snprintf(sql, sizeof(sql), "SELECT to_regclass('%s') IS NOT NULL", name);
		if (query1(w, "checking a partition", sql, got, sizeof(got)) || strcmp(got, "t")) {
			fprintf(stderr, "iot-sink: warning: partition %s: %s: its rows go to %s_default\n",
				name, w->err, w->table);
			if (PQstatus(w->conn) != CONNECTION_OK)
				return -1;
		}
	}
	day_remember(w, day);
	return 0;
}

static int schema(struct pgw *w)
{
	char sql[1024], kind[8], ext[8];

	if (run(w, "locking the schema setup", "SELECT pg_advisory_lock(" SCHEMA_LOCK ")", NULL))
		return -1;
	snprintf(sql, sizeof(sql), "SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass('%s')",
		 w->table);
	if (query1(w, "reading the catalog", sql, kind, sizeof(kind)) ||
	    query1(w, "reading the catalog",
		   "SELECT count(*) FROM pg_extension WHERE extname = 'timescaledb'", ext, sizeof(ext)))
		goto fail;
	w->timescale = strcmp(ext, "0") != 0;
	if (!kind[0]) {
		snprintf(sql, sizeof(sql),
			 "CREATE TABLE %s (ts timestamptz NOT NULL, device text NOT NULL, "
			 "gateway text NOT NULL, seq bigint NOT NULL, idx integer NOT NULL, "
			 "type text NOT NULL, labels jsonb, data jsonb NOT NULL, anomalies jsonb, "
			 "PRIMARY KEY (gateway, seq, idx, ts))%s", w->table,
			 w->timescale ? "" : " PARTITION BY RANGE (ts)");
		if (run(w, "creating the table", sql, NULL))
			goto fail;
		if (w->timescale)
			snprintf(sql, sizeof(sql), "SELECT create_hypertable('%s', 'ts', "
				 "chunk_time_interval => interval '1 day')", w->table);
		else
			snprintf(sql, sizeof(sql), "CREATE TABLE %s_default PARTITION OF %s DEFAULT",
				 w->table, w->table);
		if (run(w, "creating the table", sql, NULL))
			goto fail;
	} else if (!strcmp(kind, "p")) {
		w->timescale = false;
	} else if (w->timescale) {
		snprintf(sql, sizeof(sql), "SELECT count(*) FROM timescaledb_information.hypertables "
			 "WHERE hypertable_name = '%s'", w->table);
		if (query1(w, "reading the catalog", sql, ext, sizeof(ext)))
			goto fail;
		if (!strcmp(ext, "0")) {
			set_err(w, "table %s exists but is neither partitioned nor a hypertable", w->table);
			goto fail;
		}
	} else {
		set_err(w, "table %s exists but is not partitioned (PARTITION BY RANGE (ts))", w->table);
		goto fail;
	}
	snprintf(sql, sizeof(sql), "CREATE INDEX IF NOT EXISTS %s_device_ts ON %s (device, ts)",
		 w->table, w->table);
	if (run(w, "creating the device index", sql, NULL))
		goto fail;
	run(w, "unlocking", "SELECT pg_advisory_unlock(" SCHEMA_LOCK ")", NULL);
	return 0;
fail:
	if (PQstatus(w->conn) == CONNECTION_OK) {
		PGresult *r = PQexec(w->conn, "SELECT pg_advisory_unlock(" SCHEMA_LOCK ")");
		PQclear(r);
	}
	return -1;
}

static int session(struct pgw *w)
{
	char sql[768];

	/* a PostgreSQL that stops answering fails the batch (retried) instead
	 * of holding the sink forever */
	if (run(w, "setting statement_timeout", "SET statement_timeout = 60000", NULL))
		return -1;
	if (run(w, "creating the staging table",
		"CREATE TEMP TABLE IF NOT EXISTS sink_stage (gateway text, seq bigint, idx integer, "
		"device text, type text, labels text, ts_ms bigint, data text, anomalies text) "
		"ON COMMIT DELETE ROWS",
		NULL))
		return -1;
	if (w->insert_mode) {
		snprintf(sql, sizeof(sql),
			 "INSERT INTO %s (ts, device, gateway, seq, idx, type, labels, data, anomalies) "
			 "VALUES (timestamptz 'epoch' + $7::bigint * interval '1 millisecond', $4, $1, "
			 "$2::bigint, $3::integer, $5, $6::jsonb, $8::jsonb, $9::jsonb) "
			 "ON CONFLICT DO NOTHING", w->table);
		PGresult *r = PQprepare(w->conn, "ins", sql, NFIELDS, NULL);
		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			set_err(w, "preparing the insert: %s", PQresultErrorMessage(r));
			PQclear(r);
			return -1;
		}
		PQclear(r);
	}
	return 0;
}

int pgw_connect(struct pgw *w)
{
	long long today = (long long)time(NULL) / 86400;

	disconnect(w);
	w->conn = PQconnectdb(w->conninfo);
	if (!w->conn || PQstatus(w->conn) != CONNECTION_OK) {
		set_err(w, "connecting: %s", w->conn ? PQerrorMessage(w->conn) : "out of memory");
		disconnect(w);
		return -1;
	}
	w->ndays = 0;
	if (schema(w) || session(w))
		goto fail;
	for (int d = 0; d <= w->ahead; d++)
		if (day_ensure(w, today + d))
			goto fail;
	return 0;
fail:
	disconnect(w);
	return -1;
}

/* One COPY line back into its NFIELDS fields, unescaped into buf (for the
 * insert mode); \N is NULL. */
static int split_row(const char *s, size_t n, char *buf, const char *f[NFIELDS])
{
	int nf = 0;
	char *o = buf;

	f[nf++] = o;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];
		if (c == '\n')
			break;
		if (c == '\t') {
			*o++ = '\0';
			if (nf == NFIELDS)
				return -1;
			f[nf++] = o;
			continue;
		}
		if (c == '\\' && i + 1 < n && s[i + 1] == 'N' && f[nf - 1] == o &&
		    (i + 2 == n || s[i + 2] == '\t' || s[i + 2] == '\n')) {
			f[nf - 1] = NULL;
			i++;
			continue;
		}
		if (c == '\\' && i + 1 < n) {
			c = s[++i];
			c = c == 't' ? '\t' : c == 'n' ? '\n' : c == 'r' ? '\r' : c;
		}
		*o++ = c;
	}
	*o = '\0';
	return nf == NFIELDS ? 0 : -1;
}

static int write_insert(struct pgw *w, const struct sink_batch *b, long long *inserted)
{
	char *buf = NULL;
	size_t cap = 0;
	int rc = 0;

	for (size_t i = 0; i < b->nrows && !rc; i++) {
		const struct sink_row *row = &b->rows[i];
		const char *f[NFIELDS];
		if (row->len + 1 > cap) {
			cap = row->len + 1;
			free(buf);
			if (!(buf = malloc(cap)))
				abort();
		}
		if (split_row(b->copy + row->off, row->len, buf, f)) {
			set_err(w, "insert: a malformed row");
			rc = -1;
			break;
		}
		PGresult *r = PQexecPrepared(w->conn, "ins", NFIELDS, f, NULL, NULL, 0);
		if (PQresultStatus(r) != PGRES_COMMAND_OK) {
			set_err(w, "insert: %s", PQresultErrorMessage(r));
			rc = -1;
		} else {
			*inserted += atoll(PQcmdTuples(r));
		}
		PQclear(r);
	}
	free(buf);
	return rc;
}

static int write_copy(struct pgw *w, const struct sink_batch *b, long long *inserted)
{
	char sql[512];
	PGresult *r;
	const char *hook = getenv("IOT_SINK_TEST_CRASH");

	if (run(w, "copy", "COPY sink_stage FROM STDIN", NULL))
		return -1;
	if (PQputCopyData(w->conn, b->copy, (int)b->copy_len) != 1 ||
	    PQputCopyEnd(w->conn, NULL) != 1) {
		set_err(w, "copy: %s", PQerrorMessage(w->conn));
		return -1;
	}
	r = PQgetResult(w->conn);
	if (PQresultStatus(r) != PGRES_COMMAND_OK) {
		set_err(w, "copy: %s", PQresultErrorMessage(r));
		PQclear(r);
		while ((r = PQgetResult(w->conn)))
			PQclear(r);
		return -1;
	}
	PQclear(r);
	while ((r = PQgetResult(w->conn)))
		PQclear(r);
	if (hook && !strcmp(hook, "after-copy") && b->nrows)
		raise(SIGKILL); /* tests only: a crash mid-batch */
	snprintf(sql, sizeof(sql),
		 "INSERT INTO %s (ts, device, gateway, seq, idx, type, labels, data, anomalies) "
		 "SELECT timestamptz 'epoch' + ts_ms * interval '1 millisecond', device, gateway, seq, "
		 "idx, type, labels::jsonb, data::jsonb, anomalies::jsonb FROM sink_stage "
		 "ON CONFLICT DO NOTHING",
		 w->table);
	if (run(w, "insert from staging", sql, &r))
		return -1;
	*inserted += atoll(PQcmdTuples(r));
	PQclear(r);
	return 0;
}

int pgw_write(struct pgw *w, const struct sink_batch *b, long long *inserted)
{
	long long now_day = (long long)time(NULL) / 86400, last = -1;
	int rc;

	*inserted = 0;
	if (!pgw_connected(w)) {
		set_err(w, "not connected");
		return -1;
	}
	for (size_t i = 0; i < b->nrows; i++) {
		long long ts = b->rows[i].ts_ms;
		long long day = ts >= 0 ? ts / DAY_MS : -1;
		if (day == last || day < now_day - PAST_DAYS || day > now_day + FUTURE_DAYS)
			continue;
		last = day;
		if (day_ensure(w, day))
			goto broken;
	}
	if (run(w, "begin", "BEGIN", NULL))
		goto fail;
	rc = w->insert_mode ? write_insert(w, b, inserted) : write_copy(w, b, inserted);
	if (rc || run(w, "commit", "COMMIT", NULL)) {
		if (PQstatus(w->conn) == CONNECTION_OK) {
			PGresult *r = PQexec(w->conn, "ROLLBACK");
			PQclear(r);
		}
		goto fail;
	}
	return 0;
fail:
	if (PQstatus(w->conn) == CONNECTION_OK)
		return -1;
broken:
	disconnect(w);
	return -1;
}

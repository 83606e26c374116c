//! `PgKeys` against a real PostgreSQL (`PREREQ_PG_URL`, else the local server's `test`
//! database). Each test works in a schema of its own, dropped even when it fails; without a
//! server the tests are skipped with a printed reason, or fail under `PREREQ_REQUIRE_DB=1`.
//!
//! Covered: a key inserted by one instance wakes another's subscribers; a plain `INSERT` by
//! another connection wakes once the trigger is installed; a source on the user's own table;
//! the listener reconnects by itself and resyncs after its backend is terminated; the listener
//! stops with the last clone; keys survive a reconnect; invalid keys; a wrong table or query
//! fails at start.
#![cfg(feature = "postgres")]

#[path = "support/db.rs"]
mod db;

use db::{Schema, eventually, next_wake, pg, unique, url, wait_for};
use prereq::sql::{PgKeys, SqlKeysError};
use prereq::{KeyError, KeySource, Wake};
use sqlx::PgConnection;

async fn known<K, S: KeySource<K>>(keys: &S, key: K) -> bool {
    match keys.contains(&key).await {
        Ok(known) => known,
        Err(e) => panic!("lookup failed: {e}"),
    }
}

async fn insert<K, S: KeySource<K>>(keys: &S, key: K) {
    if let Err(e) = keys.insert(&key).await {
        panic!("insert failed: {e}");
    }
}

async fn source<K: prereq::sql::SqlKey>(schema: &Schema) -> PgKeys<K> {
    match PgKeys::builder(url()).schema(&schema.name).connect().await {
        Ok(keys) => keys,
        Err(e) => panic!("connect: {e}"),
    }
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    if let Err(e) = sqlx::query(sql).execute(&mut *conn).await {
        panic!("{sql}: {e}");
    }
}

/// How many server backends carry this application name.
async fn backends(conn: &mut PgConnection, application_name: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
        .bind(application_name)
        .fetch_one(&mut *conn)
        .await
        .expect("pg_stat_activity")
}

#[tokio::test]
async fn a_key_inserted_by_one_instance_wakes_another_and_survives_a_restart() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "cross").await;
    let a: PgKeys<i64> = source(&schema).await;
    let b: PgKeys<i64> = source(&schema).await;
    let mut b_wakes = b.subscribe();

    assert!(!known(&b, 5).await);
    insert(&a, 5).await;
    assert_eq!(
        next_wake(&mut b_wakes).await,
        Wake::Known(5),
        "through NOTIFY"
    );
    assert!(known(&b, 5).await);
    insert(&a, 5).await; // idempotent

    drop((a, b, b_wakes));
    let restarted: PgKeys<i64> = source(&schema).await;
    assert!(known(&restarted, 5).await, "known after a restart");
    assert!(!known(&restarted, 6).await);
}

#[tokio::test]
async fn a_plain_insert_by_another_service_wakes_once_the_trigger_is_installed() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "trigger").await;
    let (a, b) = tokio::join!(source::<String>(&schema), source::<String>(&schema));
    // Several instances at once, and again: idempotent.
    let (ra, rb) = tokio::join!(a.install_notify_trigger(), b.install_notify_trigger());
    ra.expect("install from a");
    rb.expect("install from b");
    a.install_notify_trigger().await.expect("install again");

    let mut wakes = b.subscribe();
    exec(
        &mut conn,
        &format!(
            "INSERT INTO {} (key) VALUES ('from-elsewhere')",
            schema.qualify("prereq_keys")
        ),
    )
    .await;
    assert_eq!(
        next_wake(&mut wakes).await,
        Wake::Known("from-elsewhere".to_owned())
    );
    assert!(known(&a, "from-elsewhere".to_owned()).await);
}

#[tokio::test]
async fn a_source_on_the_users_own_table_reads_it_and_hears_its_channel() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "own").await;
    let customers = schema.qualify("customers");
    exec(
        &mut conn,
        &format!("CREATE TABLE {customers} (id INTEGER PRIMARY KEY, name TEXT)"),
    )
    .await;
    exec(
        &mut conn,
        &format!("INSERT INTO {customers} VALUES (1, 'Ada')"),
    )
    .await;
    let channel = unique("customer_created");
    let keys: PgKeys<u32> = PgKeys::builder(url())
        .existence_query(format!(
            "SELECT EXISTS(SELECT 1 FROM {customers} WHERE id = $1)"
        ))
        .channel(&channel)
        .connect()
        .await
        .expect("connect");
    assert_eq!(keys.channel(), Some(channel.as_str()));
    assert!(known(&keys, 1).await);
    assert!(!known(&keys, 2).await);

    let mut wakes = keys.subscribe();
    // Another service creates a customer and notifies, in one transaction.
    exec(
        &mut conn,
        &format!(
            "WITH c AS (INSERT INTO {customers} VALUES (2, 'Grace') RETURNING id) \
             SELECT pg_notify('{channel}', id::text) FROM c"
        ),
    )
    .await;
    assert_eq!(next_wake(&mut wakes).await, Wake::Known(2));
    assert!(known(&keys, 2).await);

    // insert only tells this instance: the table is the user's.
    insert(&keys, 3).await;
    assert_eq!(next_wake(&mut wakes).await, Wake::Known(3));
    assert!(
        !known(&keys, 3).await,
        "prereq never writes to the user's table"
    );

    // A payload that is no key: held keys are looked up again.
    exec(
        &mut conn,
        &format!("SELECT pg_notify('{channel}', 'not-a-number')"),
    )
    .await;
    assert_eq!(next_wake(&mut wakes).await, Wake::Resync);

    // The same table through the trigger SQL prereq ships, run as a migration would.
    let sql = prereq::sql::notify_trigger_sql(Some(&schema.name), "customers", "id", &channel)
        .expect("trigger sql");
    sqlx::raw_sql(&sql)
        .execute(&mut conn)
        .await
        .expect("install trigger");
    exec(
        &mut conn,
        &format!("INSERT INTO {customers} VALUES (4, 'Hedy')"),
    )
    .await;
    assert_eq!(next_wake(&mut wakes).await, Wake::Known(4));
}

#[tokio::test]
async fn the_listener_reconnects_by_itself_and_resyncs() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "reconnect").await;
    let app = unique("app");
    let keys: PgKeys<i64> = PgKeys::builder(url())
        .schema(&schema.name)
        .application_name(&app)
        .connect()
        .await
        .expect("connect");
    let channel = keys.channel().expect("a channel").to_owned();
    let mut wakes = keys.subscribe();

    // The function in the select list: it runs for the matching backends only.
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(&app)
    .fetch_one(&mut conn)
    .await
    .expect("terminate");
    assert!(terminated >= 1, "the listener's backend was found");

    wait_for(&mut wakes, Wake::Resync).await;
    // Listening again: a notification from elsewhere arrives.
    exec(&mut conn, &format!("SELECT pg_notify('{channel}', '11')")).await;
    wait_for(&mut wakes, Wake::Known(11)).await;
    // The pool recovered too.
    insert(&keys, 12).await;
    assert!(known(&keys, 12).await);
}

#[tokio::test]
async fn the_listener_stops_with_the_last_clone() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "stop").await;
    let app = unique("app");
    let keys: PgKeys<i64> = PgKeys::builder(url())
        .schema(&schema.name)
        .application_name(&app)
        .connect()
        .await
        .expect("connect");
    let clone = keys.clone();
    let mut wakes = clone.subscribe();
    drop(keys);
    assert!(
        backends(&mut conn, &app).await >= 1,
        "a clone keeps the listener"
    );
    drop(clone);
    eventually("every connection of the source closed", async || {
        backends(&mut conn, &app).await == 0
    })
    .await;
    assert_eq!(
        tokio::time::timeout(db::PATIENCE, wakes.next()).await.ok(),
        Some(None),
        "the subscription ends with the source"
    );
}

#[tokio::test]
async fn invalid_keys_are_refused_not_held() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "invalid").await;
    let numbers: PgKeys<u64> = source(&schema).await;
    let too_big = i64::MAX as u64 + 1;
    assert!(matches!(
        numbers.contains(&too_big).await,
        Err(KeyError::InvalidKey(reason)) if reason.contains(&too_big.to_string())
    ));
    assert!(matches!(
        numbers.insert(&u64::MAX).await,
        Err(KeyError::InvalidKey(_))
    ));
    insert(&numbers, i64::MAX as u64).await;
    assert!(known(&numbers, i64::MAX as u64).await);

    let texts: PgKeys<String> = PgKeys::builder(url())
        .schema(&schema.name)
        .table("text_keys")
        .connect()
        .await
        .expect("connect");
    assert!(matches!(
        texts.insert(&"a\0b".to_owned()).await,
        Err(KeyError::InvalidKey(_))
    ));
    let long = "x".repeat(prereq::sql::MAX_TEXT_KEY_BYTES + 1);
    assert!(matches!(
        texts.contains(&long).await,
        Err(KeyError::InvalidKey(_))
    ));
    let longest = "é".repeat(prereq::sql::MAX_TEXT_KEY_BYTES / 2);
    insert(&texts, longest.clone()).await;
    assert!(known(&texts, longest).await);
}

#[tokio::test]
async fn a_wrong_table_or_query_fails_at_start() {
    let Some(mut conn) = pg().await else { return };
    let schema = Schema::create(&mut conn, "wrong").await;
    drop(source::<i64>(&schema).await);
    let err = PgKeys::<String>::builder(url())
        .schema(&schema.name)
        .connect()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Setup { reason, .. }) if reason.contains("bigint")),
        "a table of integer keys refuses text keys: {err:?}"
    );

    let err = PgKeys::<i64>::builder(url())
        .existence_query(format!(
            "SELECT 1 FROM {} WHERE key = $1",
            schema.qualify("prereq_keys")
        ))
        .connect()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Config(reason)) if reason.contains("boolean")),
        "{err:?}"
    );

    let err = PgKeys::<i64>::builder(url())
        .existence_query("SELECT EXISTS(SELECT 1 FROM nowhere_at_all WHERE id = $1)")
        .connect()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Setup { reason, .. }) if reason.contains("nowhere_at_all")),
        "{err:?}"
    );

    let err = PgKeys::<i64>::builder(url())
        .schema(unique("no_such_schema"))
        .connect()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Setup { reason, .. }) if reason.contains("no_such_schema")),
        "{err:?}"
    );
}

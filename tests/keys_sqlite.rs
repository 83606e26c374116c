//! `SqliteKeys` on real files in temporary directories: keys survive a restart (drop and
//! reopen), clones and two pools share one file (WAL mode, concurrent writers), subscribers hear
//! of new keys once, invalid keys are refused, and a wrong file, table or query fails at open.
#![cfg(feature = "sqlite")]

use std::time::Duration;

use prereq::sql::{SqlKeysError, SqliteKeys};
use prereq::{KeyError, KeySource, KeyWakes, Wake};
use sqlx::{Connection, SqliteConnection};

const PATIENCE: Duration = Duration::from_secs(20);

async fn next_wake<K: Clone>(wakes: &mut KeyWakes<K>) -> Option<Wake<K>> {
    tokio::time::timeout(PATIENCE, wakes.next())
        .await
        .expect("a wake within the patience")
}

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

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("a temporary directory")
}

#[tokio::test]
async fn a_key_survives_a_restart() {
    let dir = dir();
    let path = dir.path().join("keys.db");
    let keys: SqliteKeys<u64> = SqliteKeys::open(&path).await.expect("open");
    insert(&keys, 42).await;
    assert!(known(&keys, 42).await);
    assert!(!known(&keys, 43).await);
    drop(keys);

    let reopened: SqliteKeys<u64> = SqliteKeys::open(&path).await.expect("reopen");
    assert!(known(&reopened, 42).await, "known after the restart");
    assert!(!known(&reopened, 43).await);

    let mut conn = SqliteConnection::connect(&format!("sqlite://{}", path.display()))
        .await
        .expect("connect");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
}

#[tokio::test]
async fn clones_and_two_pools_on_one_file_share_keys() {
    let dir = dir();
    let path = dir.path().join("shared.db");
    let (a, c) = tokio::join!(
        SqliteKeys::<i64>::open(&path),
        SqliteKeys::<i64>::builder(&path).max_connections(2).open()
    );
    let (a, c) = (a.expect("open a"), c.expect("open c"));
    let b = a.clone();
    let mut wakes = b.subscribe();

    insert(&a, 1).await;
    assert_eq!(
        next_wake(&mut wakes).await,
        Some(Wake::Known(1)),
        "a clone hears"
    );
    assert!(known(&c, 1).await, "the other pool sees the key");

    // Two pools writing at once: writers wait for each other (busy timeout), none fails.
    let (ra, rc) = tokio::join!(
        futures::future::join_all((100..300).map(|k| {
            let a = a.clone();
            async move { a.insert(&k).await }
        })),
        futures::future::join_all((200..400).map(|k| {
            let c = c.clone();
            async move { c.insert(&k).await }
        }))
    );
    for r in ra.into_iter().chain(rc) {
        if let Err(e) = r {
            panic!("concurrent insert failed: {e}");
        }
    }
    for k in 100..400 {
        assert!(known(&a, k).await && known(&c, k).await, "key {k}");
    }
}

#[tokio::test]
async fn a_key_is_notified_once_however_often_it_is_inserted() {
    let dir = dir();
    let keys: SqliteKeys<String> = SqliteKeys::open(dir.path().join("k.db"))
        .await
        .expect("open");
    let mut wakes = keys.subscribe();
    insert(&keys, "client-7".to_owned()).await;
    insert(&keys, "client-7".to_owned()).await;
    insert(&keys, "client-8".to_owned()).await;
    assert_eq!(
        next_wake(&mut wakes).await,
        Some(Wake::Known("client-7".to_owned()))
    );
    assert_eq!(
        next_wake(&mut wakes).await,
        Some(Wake::Known("client-8".to_owned())),
        "no second wake for a key already known"
    );
    assert!(known(&keys, "client-7".to_owned()).await);
    assert!(!known(&keys, "client-9".to_owned()).await);
    assert!(!known(&keys, String::new()).await);
}

#[tokio::test]
async fn invalid_keys_are_refused_not_held() {
    let dir = dir();
    let numbers: SqliteKeys<u64> = SqliteKeys::open(dir.path().join("n.db"))
        .await
        .expect("open");
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

    let texts: SqliteKeys<String> = SqliteKeys::open(dir.path().join("t.db"))
        .await
        .expect("open");
    let long = "x".repeat(prereq::sql::MAX_TEXT_KEY_BYTES + 1);
    assert!(matches!(
        texts.insert(&long).await,
        Err(KeyError::InvalidKey(_))
    ));
    assert!(matches!(
        texts.contains(&"a\0b".to_owned()).await,
        Err(KeyError::InvalidKey(_))
    ));
}

#[tokio::test]
async fn an_existence_query_reads_a_table_of_the_users_and_never_writes() {
    let dir = dir();
    let path = dir.path().join("app.db");
    let url = format!("sqlite://{}?mode=rwc", path.display());
    let mut conn = SqliteConnection::connect(&url).await.expect("connect");
    sqlx::query("CREATE TABLE clients (id INTEGER PRIMARY KEY, name TEXT)")
        .execute(&mut conn)
        .await
        .expect("create");
    sqlx::query("INSERT INTO clients VALUES (1, 'Ada')")
        .execute(&mut conn)
        .await
        .expect("insert");

    let keys: SqliteKeys<u32> = SqliteKeys::builder(&path)
        .existence_query("SELECT EXISTS(SELECT 1 FROM clients WHERE id = ?1)")
        .open()
        .await
        .expect("open");
    assert!(known(&keys, 1).await);
    assert!(!known(&keys, 2).await);

    let mut wakes = keys.subscribe();
    insert(&keys, 2).await;
    assert_eq!(next_wake(&mut wakes).await, Some(Wake::Known(2)));
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM clients")
        .fetch_one(&mut conn)
        .await
        .expect("count");
    assert_eq!(rows, 1, "prereq wrote nothing");
    assert!(!known(&keys, 2).await, "the user's table decides");

    sqlx::query("INSERT INTO clients VALUES (2, 'Grace')")
        .execute(&mut conn)
        .await
        .expect("insert");
    assert!(known(&keys, 2).await);

    // A query of the `SELECT 1 … WHERE` kind: no row is unknown.
    let plain: SqliteKeys<i64> = SqliteKeys::builder(&path)
        .existence_query("SELECT 1 FROM clients WHERE id = ?1")
        .open()
        .await
        .expect("open");
    assert!(known(&plain, 1).await);
    assert!(!known(&plain, 3).await);
}

#[tokio::test]
async fn a_wrong_file_table_or_query_fails_at_open() {
    let dir = dir();
    let missing_dir = dir.path().join("no-such-dir").join("keys.db");
    let err = SqliteKeys::<u64>::open(&missing_dir).await.err();
    assert!(
        matches!(&err, Some(SqlKeysError::Connect { target, .. }) if target.contains("no-such-dir")),
        "{err:?}"
    );

    let path = dir.path().join("typed.db");
    drop(SqliteKeys::<u64>::open(&path).await.expect("open"));
    let err = SqliteKeys::<String>::open(&path).await.err();
    assert!(
        matches!(&err, Some(SqlKeysError::Setup { reason, .. }) if reason.contains("INTEGER")),
        "a table of integer keys refuses text keys: {err:?}"
    );

    let err = SqliteKeys::<u64>::builder(&path)
        .existence_query("SELECT EXISTS(SELECT 1 FROM nowhere WHERE id = ?1)")
        .open()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Setup { reason, .. }) if reason.contains("nowhere")),
        "{err:?}"
    );

    let err = SqliteKeys::<u64>::builder(dir.path().join("absent.db"))
        .existence_query("SELECT EXISTS(SELECT 1 FROM clients WHERE id = ?1)")
        .open()
        .await
        .err();
    assert!(
        matches!(&err, Some(SqlKeysError::Connect { .. })),
        "an existence query never creates the file: {err:?}"
    );
    assert!(!dir.path().join("absent.db").exists());

    let err = SqliteKeys::<u64>::builder(&path)
        .table("")
        .open()
        .await
        .err();
    assert!(matches!(&err, Some(SqlKeysError::Config(_))), "{err:?}");
}

#[tokio::test]
async fn a_custom_table_name_is_quoted() {
    let dir = dir();
    let path = dir.path().join("custom.db");
    let keys: SqliteKeys<i64> = SqliteKeys::builder(&path)
        .table("my keys\"; DROP TABLE x; --")
        .open()
        .await
        .expect("open");
    insert(&keys, 5).await;
    assert!(known(&keys, 5).await);
    let other: SqliteKeys<i64> = SqliteKeys::builder(&path)
        .table("other")
        .open()
        .await
        .expect("open");
    assert!(!known(&other, 5).await, "tables are separate");
}

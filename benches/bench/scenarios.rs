//! The broker scenarios in order (raw, steady, raw latency, the races, the router's hop), their
//! table rows, figures and plot.

use std::collections::HashMap;

use prereq::HoldBudget;

use crate::Res;
use crate::big::big_hold;
use crate::cpu::PerMsg;
use crate::data::{BIG_BODY_BYTES, BODY_BYTES, RaceData};
use crate::env::Env;
use crate::figures::{Figures, percentile};
use crate::plot::plot;
use crate::race::{Race, race};
use crate::raw::{Meanwhile, Raw, raw, raw_latency};
use crate::router::{p50_p99, router_hop};
use crate::rss::peak_rss_mb;
use crate::sizes::Sizes;
use crate::steady::{Steady, steady};
use crate::table::Table;

/// A CPU figure in microseconds, or "-" where it could not be read.
fn opt_us(us: Option<f64>) -> String {
    us.map_or_else(|| "-".to_owned(), |us| format!("{us:.1}"))
}

/// Held memory per message, in KiB: the heap growth while the payments came in, over the
/// payments held then.
fn held_kb_per_msg(r: &Race) -> f64 {
    if r.held_at_intake == 0 {
        return f64::NAN;
    }
    r.intake_heap_bytes as f64 / 1024.0 / r.held_at_intake as f64
}

/// raw, steady, raw latency, race (prereq and seed-style), bounded and the large-body race;
/// returns the highest peak RSS seen.
pub async fn broker_scenarios(env: &Env, s: &Sizes, f: &mut Figures, t: &mut Table) -> Res<f64> {
    if s.mode == "big" {
        return big_figures(env, s, f, t).await;
    }
    if s.mode == "race" {
        return race_alone(env, s, f, t).await;
    }
    raw_and_steady(env, s, f, t).await?;
    if s.mode == "steady" {
        return Ok(crate::rss::peak_rss_mb());
    }

    let data = RaceData::new(s.race_n, s.race_k, s.race_t, 0x5EED_5EED);
    let n = s.race_n as f64;
    let floor = raw_latency(env, &data, Meanwhile::Nothing).await?.ms;
    let (f50, f99, fmax) = (
        percentile(&floor, 50.0),
        percentile(&floor, 99.0),
        percentile(&floor, 100.0),
    );
    t.row(
        "raw lapin publish -> delivery (race schedule)",
        format!("p50/p99/max {f50:.2} / {f99:.2} / {fmax:.2} ms"),
    );
    f.num("raw_latency_p50_ms", f50, 3);
    f.num("raw_latency_p99_ms", f99, 3);
    f.num("raw_latency_max_ms", fmax, 3);
    let loaded = raw_latency(env, &data, Meanwhile::Releasing).await?;
    let loaded_cpu = loaded.cpu;
    let loaded = loaded.ms;
    let (l50, l99) = (percentile(&loaded, 50.0), percentile(&loaded, 99.0));
    t.row(
        "raw lapin publish -> delivery, releasing payments meanwhile",
        format!("p50/p99 {l50:.2} / {l99:.2} ms"),
    );
    f.num("raw_loaded_latency_p50_ms", l50, 3);
    f.num("raw_loaded_latency_p99_ms", l99, 3);
    let mut peak = peak_rss_mb();
    let mut runs: HashMap<&str, Race> = HashMap::new();
    let bounded_budget = (s.race_n / 4).max(1);
    for (name, budget, body) in [
        ("race", HoldBudget::DEFAULT, BODY_BYTES),
        ("seed", HoldBudget::NONE, BODY_BYTES),
        (
            "bounded",
            HoldBudget::DEFAULT.max_messages(bounded_budget),
            BODY_BYTES,
        ),
        ("race1k", HoldBudget::DEFAULT, BIG_BODY_BYTES),
    ] {
        // Bare lapin beside the default race: its baseline at the same instants.
        let r = race(env, name, &data, budget, body, name == "race").await?;
        if r.early > 0 {
            return Err(
                format!("{name}: {} handlers ran before their key arrived", r.early).into(),
            );
        }
        peak = peak.max(r.peak_rss_mb);
        runs.insert(name, r);
    }
    let run = |name: &str| runs.get(name).ok_or_else(|| format!("{name}: did not run"));
    f.set("race_n", s.race_n as u64);
    f.set("race_k", s.race_k);
    f.num("race_t_s", s.race_t.as_secs_f64(), 3);
    for (name, label) in [
        ("race", "race, prereq default (hold)"),
        ("seed", "race, seed-style (no hold)"),
    ] {
        let r = run(name)?;
        let (p50, p99, max) = (
            percentile(&r.latencies_ms, 50.0),
            percentile(&r.latencies_ms, 99.0),
            percentile(&r.latencies_ms, 100.0),
        );
        t.row(
            &format!("{label}: release p50/p99/max"),
            format!("{p50:.2} / {p99:.2} / {max:.2} ms"),
        );
        t.row(
            &format!("{label}: drain, re-publish/msg"),
            format!(
                "{:.2} s, {:.3} ({} deferred)",
                r.drain.as_secs_f64(),
                r.deferred as f64 / n,
                r.deferred
            ),
        );
        t.row(
            &format!("{label}: peak held, peak RSS"),
            format!(
                "{}, {:.1} MiB (RSS before {:.1} MiB)",
                r.report.peak_held, r.peak_rss_mb, r.rss_before_mb
            ),
        );
        f.num(&format!("{name}_release_p50_ms"), p50, 3);
        f.num(&format!("{name}_release_p99_ms"), p99, 3);
        f.num(&format!("{name}_release_max_ms"), max, 3);
        f.num(&format!("{name}_drain_s"), r.drain.as_secs_f64(), 3);
        f.num(&format!("{name}_peak_rss_mb"), r.peak_rss_mb, 1);
        f.set(&format!("{name}_peak_held"), r.report.peak_held as u64);
    }
    f.num("republish_per_msg", run("race")?.deferred as f64 / n, 4);
    f.num(
        "seed_republish_per_msg",
        run("seed")?.deferred as f64 / n,
        4,
    );
    let b = run("bounded")?;
    t.row(
        "bounded (hold budget N/4): peak held",
        format!(
            "{} of budget {bounded_budget}, {:.1} MiB peak RSS, {:.3} re-publish/msg, release p99 {:.2} ms",
            b.report.peak_held,
            b.peak_rss_mb,
            b.deferred as f64 / n,
            percentile(&b.latencies_ms, 99.0)
        ),
    );
    f.set("bounded_budget", bounded_budget as u64);
    f.set("bounded_peak_held", b.report.peak_held as u64);
    f.num("bounded_peak_rss_mb", b.peak_rss_mb, 1);
    f.num("bounded_republish_per_msg", b.deferred as f64 / n, 4);
    f.num(
        "bounded_release_p99_ms",
        percentile(&b.latencies_ms, 99.0),
        3,
    );
    let race = run("race")?;
    let (first_p99, key_p50, key_p99, lane_p50, lane_p99) = (
        percentile(&race.first_of_key_ms, 99.0),
        percentile(&race.key_path_ms, 50.0),
        percentile(&race.key_path_ms, 99.0),
        percentile(&race.lane_ms, 50.0),
        percentile(&race.lane_ms, 99.0),
    );
    t.row(
        "race, prereq: where the release time goes",
        format!(
            "registration publish -> engine p50/p99 {key_p50:.2} / {key_p99:.2} ms; \
             released -> handler p50/p99 {lane_p50:.2} / {lane_p99:.2} ms; \
             first payment of each key p99 {first_p99:.2} ms"
        ),
    );
    f.num("race_key_path_p50_ms", key_p50, 3);
    f.num("race_key_path_p99_ms", key_p99, 3);
    f.num("race_lane_p50_ms", lane_p50, 3);
    f.num("race_lane_p99_ms", lane_p99, 3);
    f.num("race_first_of_key_p99_ms", first_p99, 3);
    for (i, (hop, ms)) in crate::race::HOPS.iter().zip(&race.hops_ms).enumerate() {
        let (p50, p99) = (percentile(ms, 50.0), percentile(ms, 99.0));
        t.row(
            &format!("race, key path hop {}: {hop}", i + 1),
            format!(
                "p50/p99 {p50:.3} / {p99:.3} ms ({} registrations)",
                ms.len()
            ),
        );
        f.num(&format!("probe_hop{}_p50_ms", i + 1), p50, 3);
        f.num(&format!("probe_hop{}_p99_ms", i + 1), p99, 3);
    }
    if !race.shadow_ms.is_empty() {
        let (s50, s99) = (
            percentile(&race.shadow_ms, 50.0),
            percentile(&race.shadow_ms, 99.0),
        );
        let (o50, o99) = (
            percentile(&race.over_shadow_ms, 50.0),
            percentile(&race.over_shadow_ms, 99.0),
        );
        t.row(
            "race, bare lapin beside prereq (same registrations)",
            format!(
                "publish -> delivery p50/p99 {s50:.2} / {s99:.2} ms; prereq's key path minus \
                 it, per registration, p50/p99 {o50:.3} / {o99:.3} ms"
            ),
        );
        f.num("race_shadow_p50_ms", s50, 3);
        f.num("race_shadow_p99_ms", s99, 3);
        f.num("key_path_minus_shadow_p50_ms", o50, 3);
        f.num("key_path_minus_shadow_p99_ms", o99, 3);
        f.num("key_path_over_shadow_p99", key_p99 / s99, 3);
        f.num(
            "release_over_shadow_p99",
            percentile(&race.latencies_ms, 99.0) / s99,
            3,
        );
    }
    let cpu = &race.release_cpu;
    t.row(
        "race, CPU per payment while releasing: prereq / bare lapin",
        release_cpu(cpu, &loaded_cpu),
    );
    f.num("race_release_cpu_us_per_msg", cpu.own_us, 2);
    f.num("loaded_release_cpu_us_per_msg", loaded_cpu.own_us, 2);
    if let (Some(a), Some(b)) = (cpu.broker_us, loaded_cpu.broker_us) {
        f.num("race_release_broker_cpu_us_per_msg", a, 2);
        f.num("loaded_release_broker_cpu_us_per_msg", b, 2);
    }
    f.num("key_path_over_raw_p99", key_p99 / f99, 3);
    f.num("key_path_over_loaded_p99", key_p99 / l99, 3);
    let (rel_p99, big) = (percentile(&race.latencies_ms, 99.0), run("race1k")?);
    f.num("release_over_raw_p99", rel_p99 / f99, 3);
    f.num("release_over_loaded_p99", rel_p99 / l99, 3);
    let (held_kb, held_kb_1k) = (held_kb_per_msg(race), held_kb_per_msg(big));
    t.row(
        "held memory per payment (heap growth / held)",
        format!(
            "{held_kb:.2} KiB ({BODY_BYTES}-byte bodies, {} held), {held_kb_1k:.2} KiB \
             ({BIG_BODY_BYTES}-byte bodies, {} held)",
            race.held_at_intake, big.held_at_intake
        ),
    );
    f.num("held_kb_per_msg", held_kb, 3);
    f.num("held_kb_per_msg_1k", held_kb_1k, 3);
    f.num(
        "race1k_release_p99_ms",
        percentile(&big.latencies_ms, 99.0),
        3,
    );

    let svg = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/release-latency.svg");
    let title = format!(
        "Release latency, {} payments / {} clients, keys within {:.0} s ({} mode)",
        s.race_n,
        s.race_k,
        s.race_t.as_secs_f64(),
        s.mode
    );
    match plot(&svg, &race.latencies_ms, &run("seed")?.latencies_ms, &title) {
        Ok(()) => t.row("plot", "docs/release-latency.svg".to_owned()),
        Err(e) => t.row("plot", format!("not written: {e}")),
    }

    let hop = router_hop(env, s.n).await?;
    let (d50, d99) = p50_p99(&hop.direct);
    let (r50, r99) = p50_p99(&hop.routed);
    t.row(
        "keyed publish -> partition (direct)",
        format!(
            "p50/p99 {d50:.2} / {d99:.2} ms, {:.0} msg/s",
            hop.direct.per_s
        ),
    );
    t.row(
        "publish -> router -> partition",
        format!(
            "p50/p99 {r50:.2} / {r99:.2} ms = {:.2}x / {:.2}x direct, {:.0} msg/s = {:.2}x direct",
            r50 / d50,
            r99 / d99,
            hop.routed.per_s,
            hop.routed.per_s / hop.direct.per_s
        ),
    );
    f.num("direct_keyed_p50_ms", d50, 3);
    f.num("direct_keyed_p99_ms", d99, 3);
    f.num("direct_keyed_per_s", hop.direct.per_s, 0);
    f.num("routed_p50_ms", r50, 3);
    f.num("routed_p99_ms", r99, 3);
    f.num("routed_per_s", hop.routed.per_s, 0);
    f.num("router_hop_p50_ratio", r50 / d50, 3);
    f.num("router_hop_p99_ratio", r99 / d99, 3);
    f.num(
        "router_hop_throughput_ratio",
        hop.routed.per_s / hop.direct.per_s,
        3,
    );

    if s.big_n > 0 {
        peak = peak.max(big_figures(env, s, f, t).await?);
    }
    Ok(peak)
}

/// Payments held (of clients that never come) ahead of the steady ones in
/// `steady_behind_hold`: the default hold budget's worth.
const HELD_BEHIND: usize = 10_000;

/// Bare lapin (publish with confirms; consume with each ack awaited, and with acks pipelined)
/// and prereq's steady state, three rounds in turn (`PREREQ_BENCH_ROUNDS` sets another number,
/// 1 for instruction counts): the broker's own speed drifts between rounds and sometimes
/// doubles, so each figure is the median of the rounds, and the ratios are taken round by round.
async fn raw_and_steady(env: &Env, s: &Sizes, f: &mut Figures, t: &mut Table) -> Res<()> {
    let rounds = rounds();
    let mut all = Vec::with_capacity(rounds);
    for round in 1..=rounds {
        let r = raw(env, s).await?;
        let st = steady(env, s, 0).await?;
        t.row(
            &format!("round {round}: steady / raw pipelined"),
            format!(
                "{:.0} / {:.0} msg/s = {:.2}x; CPU this process {:.1} / {:.1} us, broker {} / {} us",
                st.per_s,
                r.consume_pipelined_per_s,
                st.per_s / r.consume_pipelined_per_s,
                st.cpu.own_us,
                r.cpu.own_us,
                opt_us(st.cpu.broker_us),
                opt_us(r.cpu.broker_us)
            ),
        );
        all.push((r, st));
    }
    let median = |pick: &dyn Fn(&(Raw, Steady)) -> Option<f64>| {
        let mut v: Vec<f64> = all.iter().filter_map(pick).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let publish = median(&|(r, _)| Some(r.publish_per_s));
    let awaited = median(&|(r, _)| Some(r.consume_per_s));
    let pipelined = median(&|(r, _)| Some(r.consume_pipelined_per_s));
    let steady_per_s = median(&|(_, st)| Some(st.per_s));
    let ratio = median(&|(r, st)| Some(st.per_s / r.consume_per_s));
    let ratio_pipelined = median(&|(r, st)| Some(st.per_s / r.consume_pipelined_per_s));
    t.row(
        "raw lapin publish (confirms)",
        format!("{publish:.0} msg/s ({} msgs, median of {rounds})", s.n),
    );
    t.row(
        "raw lapin consume (each ack awaited)",
        format!("{awaited:.0} msg/s"),
    );
    t.row(
        "raw lapin consume (acks pipelined)",
        format!("{pipelined:.0} msg/s"),
    );
    t.row(
        "steady (prereq, keys known)",
        format!(
            "{steady_per_s:.0} msg/s; median ratio {ratio:.2}x raw (awaited), {ratio_pipelined:.2}x raw (pipelined)"
        ),
    );
    f.set("n", s.n as u64);
    f.set("rounds", rounds as u64);
    f.num("raw_publish_per_s", publish, 0);
    f.num("raw_consume_per_s", awaited, 0);
    f.num("raw_consume_pipelined_per_s", pipelined, 0);
    f.num("steady_per_s", steady_per_s, 0);
    f.num("steady_ratio", ratio, 3);
    f.num("steady_ratio_pipelined", ratio_pipelined, 3);
    f.set(
        "steady_ratio_pipelined_rounds",
        all.iter()
            .map(|(r, st)| format!("{:.2}", st.per_s / r.consume_pipelined_per_s))
            .collect::<Vec<_>>()
            .join(" / "),
    );
    f.num(
        "raw_cpu_us_per_msg",
        median(&|(r, _)| Some(r.cpu.own_us)),
        2,
    );
    f.num(
        "steady_cpu_us_per_msg",
        median(&|(_, st)| Some(st.cpu.own_us)),
        2,
    );
    // The same payments behind a full default hold, against the rounds' rate measured alike
    // (from the first handled payment, once what is held was taken in).
    let behind = steady(env, s, HELD_BEHIND).await?;
    let plain = median(&|(_, st)| Some(st.after_first_per_s));
    t.row(
        &format!("steady behind {HELD_BEHIND} held payments"),
        format!(
            "{:.0} msg/s against {plain:.0} with none held = {:.2}x",
            behind.after_first_per_s,
            behind.after_first_per_s / plain
        ),
    );
    f.num("steady_behind_hold_per_s", behind.after_first_per_s, 0);
    f.num(
        "steady_behind_hold_ratio",
        behind.after_first_per_s / plain,
        3,
    );
    let raw_broker = median(&|(r, _)| r.cpu.broker_us);
    let steady_broker = median(&|(_, st)| st.cpu.broker_us);
    if raw_broker.is_finite() && steady_broker.is_finite() {
        f.num("raw_broker_cpu_us_per_msg", raw_broker, 2);
        f.num("steady_broker_cpu_us_per_msg", steady_broker, 2);
    }
    Ok(())
}

/// The big hold's table rows and figures; returns its peak RSS.
async fn big_figures(env: &Env, s: &Sizes, f: &mut Figures, t: &mut Table) -> Res<f64> {
    let b = big_hold(env, s.big_n, s.big_k).await?;
    for (label, d) in [
        ("prereq", Some(&b.prereq)),
        ("bare lapin", Some(&b.raw)),
        ("bare lapin, acks by key", b.raw_by_key.as_ref()),
    ] {
        t.row(
            &format!("big hold, {label}: {} payments drained", s.big_n),
            d.map_or_else(
                || "not run (more than one prefetch)".to_owned(),
                |d| {
                    format!(
                        "{:.0} msg/s, p50/p99 {:.0} / {:.0} ms, peak RSS {:.1} MiB (from {:.1})",
                        d.per_s, d.p50_ms, d.p99_ms, d.peak_rss_mb, d.rss_before_mb
                    )
                },
            ),
        );
    }
    t.row("big hold, prereq: most held at once", b.held.to_string());
    f.set("big_n", s.big_n as u64);
    f.set("big_held", b.held);
    f.num("big_release_per_s", b.prereq.per_s, 0);
    f.num("big_release_p50_ms", b.prereq.p50_ms, 1);
    f.num("big_release_p99_ms", b.prereq.p99_ms, 1);
    f.num("big_peak_rss_mb", b.prereq.peak_rss_mb, 1);
    f.num("big_rss_before_mb", b.prereq.rss_before_mb, 1);
    f.num("big_raw_per_s", b.raw.per_s, 0);
    f.num("big_raw_p50_ms", b.raw.p50_ms, 1);
    f.num("big_raw_p99_ms", b.raw.p99_ms, 1);
    f.num("big_raw_peak_rss_mb", b.raw.peak_rss_mb, 1);
    if let Some(by_key) = &b.raw_by_key {
        f.num("big_raw_by_key_per_s", by_key.per_s, 0);
        f.num("big_raw_by_key_p50_ms", by_key.p50_ms, 1);
        f.num("big_raw_by_key_p99_ms", by_key.p99_ms, 1);
        f.num(
            "big_release_over_raw_by_key_per_s",
            b.prereq.per_s / by_key.per_s,
            3,
        );
    }
    f.num(
        "big_release_over_raw_per_s",
        b.prereq.per_s / b.raw.per_s,
        3,
    );
    f.num(
        "big_release_over_raw_p99",
        b.prereq.p99_ms / b.raw.p99_ms,
        3,
    );
    Ok(b.prereq
        .peak_rss_mb
        .max(b.raw.peak_rss_mb)
        .max(b.raw_by_key.as_ref().map_or(0.0, |d| d.peak_rss_mb)))
}

/// CPU per released payment, prereq's race against bare lapin releasing the same payments
/// (prereq's side includes the bare lapin beside it, when it ran).
fn release_cpu(prereq: &PerMsg, bare: &PerMsg) -> String {
    format!(
        "this process {} / {} us ({:.1} / {:.1} times on a core, {:.1} / {:.1} us waiting for \
         one), broker {} / {} us",
        opt_us(Some(prereq.own_us)),
        opt_us(Some(bare.own_us)),
        prereq.own_slices,
        bare.own_slices,
        prereq.own_wait_us,
        bare.own_wait_us,
        opt_us(prereq.broker_us),
        opt_us(bare.broker_us),
    )
}

/// `PREREQ_BENCH_ROUNDS`, 3 unless set.
fn rounds() -> usize {
    std::env::var("PREREQ_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(3)
}

/// The race alone (`PREREQ_BENCH=race`): bare lapin releasing the race's payments, then prereq's
/// race with bare lapin beside it, in turn, [`rounds`] times; per round the key path against
/// the shadow, and the CPU per payment of each release, this process's and the broker's.
async fn race_alone(env: &Env, s: &Sizes, f: &mut Figures, t: &mut Table) -> Res<f64> {
    let data = RaceData::new(s.race_n, s.race_k, s.race_t, 0x5EED_5EED);
    let mut peak = peak_rss_mb();
    for round in 1..=rounds() {
        let loaded = raw_latency(env, &data, Meanwhile::Releasing).await?;
        let r = race(env, "race", &data, HoldBudget::DEFAULT, BODY_BYTES, true).await?;
        peak = peak.max(r.peak_rss_mb);
        let p99 = |v: &[f64]| percentile(v, 99.0);
        let (cpu, lcpu) = (&r.release_cpu, &loaded.cpu);
        t.row(
            &format!("round {round}: p99 loaded / shadow / key path / release"),
            format!(
                "{:.2} / {:.2} / {:.2} / {:.2} ms; key path minus shadow p50/p99 {:.3} / {:.3} ms; \
                 CPU per payment prereq / bare lapin: {}",
                p99(&loaded.ms),
                p99(&r.shadow_ms),
                p99(&r.key_path_ms),
                p99(&r.latencies_ms),
                percentile(&r.over_shadow_ms, 50.0),
                p99(&r.over_shadow_ms),
                release_cpu(cpu, lcpu),
            ),
        );
        f.num(
            &format!("round{round}_key_path_over_shadow_p99"),
            p99(&r.key_path_ms) / p99(&r.shadow_ms),
            3,
        );
        f.num(
            &format!("round{round}_race_release_cpu_us_per_msg"),
            cpu.own_us,
            2,
        );
        f.num(
            &format!("round{round}_loaded_release_cpu_us_per_msg"),
            lcpu.own_us,
            2,
        );
        if let (Some(a), Some(b)) = (cpu.broker_us, lcpu.broker_us) {
            f.num(
                &format!("round{round}_race_release_broker_cpu_us_per_msg"),
                a,
                2,
            );
            f.num(
                &format!("round{round}_loaded_release_broker_cpu_us_per_msg"),
                b,
                2,
            );
        }
    }
    Ok(peak)
}

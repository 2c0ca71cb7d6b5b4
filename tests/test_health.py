"""health.py: each monitor of the adversarial game fires on a constructed run, once, and not on a
healthy one."""
from health import Monitors


def monitors():
    return Monitors(window=5, chance_band=0.05, saturation=0.98, length_drift=0.5, zero_adv=0.5, teacher_loops=0.1,
                    loop_margin=0.2)


def rec(step, stage="gad", d_acc=0.7, length=30.0, zero=0.0, d_trained=True, loops=0.05):
    r = dict(step=step, stage=stage, d_acc=d_acc, resp_len_mean=length, zero_adv_frac=zero, loop_frac=loops)
    if d_trained:
        r["d_grad_norm"] = 0.1
    return r


def run(records):
    mon = monitors()
    return [w for r in records for w in mon.check(r)]


def test_a_healthy_game_is_quiet():
    accs = [0.6, 0.75, 0.7, 0.8, 0.65, 0.72, 0.68, 0.7]
    assert run([rec(i, "warmup" if i < 3 else "gad", d_acc=a, length=30 + i % 3) for i, a in enumerate(accs)]) == []


def test_d_near_chance_fires_once_after_a_window():
    ws = run([rec(i, "d_only", d_acc=a) for i, a in enumerate([0.5, 0.44, 0.56, 0.5, 0.52, 0.5, 0.49])])
    assert len(ws) == 1 and "step 4" in ws[0] and "near chance" in ws[0]
    # steps where D did not train (a frozen D) do not count
    assert run([rec(i, d_acc=0.5, d_trained=False) for i in range(8)]) == []


def test_d_fooled_in_the_gad_stage_fires_for_a_frozen_d_too():
    # the frozen-D arm of the first demo (48-token cut answers, n = 2): accuracy on fresh samples fell below
    # chance as G exploited the fixed D (0.5, 0.53, 0.34, 0.44, 0.28 there); D-only steps never count
    accs = [0.3, 0.3, 0.3, 0.3, 0.3, 0.9, 0.8, 0.7, 0.5, 0.53, 0.34, 0.44, 0.28]
    ws = run([rec(i, "d_only" if i < 5 else "gad", d_acc=a, d_trained=i < 5) for i, a in enumerate(accs)])
    fooled = [w for w in ws if "exploiting" in w]
    assert len(fooled) == 1 and "step 12" in fooled[0] and "0.42" in fooled[0], ws
    # a game that hovers above chance stays quiet
    accs = [0.91, 0.75, 0.78, 0.66, 0.88, 0.59, 0.84, 0.66, 0.5, 0.72, 0.66, 0.78]  # the first demo's GAD stage
    assert not [w for w in run([rec(i, "gad", d_acc=a) for i, a in enumerate(accs)]) if "exploiting" in w]


def test_the_frozen_d_arm_of_the_demo_drifts_in_length_before_it_is_fooled():
    # the README's frozen-D arm, seed 2 (the current demo): over its 10 GAD steps D falls to chance, not below,
    # so the exploit monitor stays quiet, while the lengths drift past +50% and say it first
    accs = [0.7188, 0.5, 0.6875, 0.5625, 0.625, 0.6875, 0.5938, 0.4688, 0.5, 0.4688]
    lens = [46.78, 52.25, 40.44, 52.41, 70.62, 66.59, 74.81, 58.19, 54.78, 70.28]
    ws = run([rec(16 + i, d_acc=a, length=l, d_trained=False) for i, (a, l) in enumerate(zip(accs, lens))])
    assert not [w for w in ws if "exploiting" in w or "chance" in w], ws
    drift = [w for w in ws if "response length" in w]
    assert [w.split(":")[1].strip() for w in drift] == ["step 20", "step 22", "step 25"], ws
    assert "46.8 -> 70.6" in drift[0] and "+51%" in drift[0]


def test_d_saturated_fires_and_rearms():
    accs = [0.99, 1.0, 1.0, 0.99, 1.0, 0.6, 0.6, 0.6, 0.6, 0.6, 1.0, 1.0, 1.0, 1.0, 1.0]
    ws = run([rec(i, d_acc=a) for i, a in enumerate(accs)])
    assert [w.split(":")[1].strip() for w in ws] == ["step 4", "step 14"] and all("saturated" in w for w in ws)


def test_length_drift_against_the_start_of_the_gad_stage():
    records = [rec(0, "warmup", length=5.0)] + [rec(i, length=l) for i, l in enumerate([30, 32, 40, 46], 1)]
    ws = run(records)
    assert len(ws) == 1 and "step 4" in ws[0] and "+53%" in ws[0] and "30.0 -> 46.0" in ws[0]
    assert "-60%" in run([rec(1, length=30), rec(2, length=12)])[0]


def test_zero_advantage_groups():
    ws = run([rec(i, zero=z) for i, z in enumerate([0.5, 0.75, 0.5, 0.25, 0.5, 1.0])])
    assert len(ws) == 1 and "step 4" in ws[0] and "equal rewards" in ws[0]


def test_loops_above_the_teachers_fire():
    # the teacher's answers loop at 10%; the samples at 15-25% are within the margin, at 40-60% not
    ws = run([rec(i, loops=v) for i, v in enumerate([0.15, 0.2, 0.25, 0.2, 0.15, 0.4, 0.5, 0.6, 0.6, 0.5])])
    loops = [w for w in ws if "loop" in w]
    assert len(loops) == 1 and "step 7" in loops[0] and "against 10% of the teacher's answers" in loops[0], ws


def test_has_loop():
    from health import has_loop
    for text in ("Aye, aye, aye, aye!", "ho ho ho ho ho", "me aye, me aye, me aye, me aye", "a b c a b c a b c a b c x"):
        assert has_loop(text), text
    for text in ("aye aye aye", "the the the cat", "Arr matey, the sea is wide and the sea is deep", ""):
        assert not has_loop(text), text

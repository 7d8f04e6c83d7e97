import numpy as np
import pytest

from m2n2_jax.tasks import skills


def test_questions_are_correct_distinct_and_avoid_excluded():
    rng = np.random.default_rng(0)
    add = skills.questions("addition", 200, rng)
    for prompt, answer in add:
        a, b = prompt[:-1].split("+")
        assert prompt.endswith("=") and int(answer) == int(a) + int(b) and 100 <= int(a) <= 999
    rev = skills.questions("reversal", 200, rng, exclude={p for p, _ in add})
    assert all(p.startswith("r:") and p[2:-1][::-1] == ans and 3 <= len(ans) <= 6 for p, ans in rev)
    assert len({p for p, _ in rev}) == 200
    more = skills.questions("reversal", 300, np.random.default_rng(1), exclude={p for p, _ in rev})
    assert not {p for p, _ in more} & {p for p, _ in rev}


def test_shift_and_short_forms():
    rng = np.random.default_rng(0)
    shift = skills.questions("shift", 100, rng)
    for prompt, answer in shift:
        assert prompt.startswith("s:") and 3 <= len(answer) <= 6 and len(answer) == len(prompt) - 3
        assert all(a == "abcdefghijklmnopqrstuvwxyza"["abcdefghijklmnopqrstuvwxyz".index(p) + 1]
                   for p, a in zip(prompt[2:-1], answer))
    assert any("z" in p for p, _ in shift)  # the wrap-around z -> a is exercised
    short_add = skills.questions("addition_short", 100, rng)
    assert all(10 <= int(x) <= 99 for p, _ in short_add for x in p[:-1].split("+"))
    assert {len(a) for _, a in skills.questions("reversal_short", 200, rng)} == {3, 4}
    with pytest.raises(ValueError, match="unknown skill 'division_short'"):
        skills.sample_question("division_short", rng)


def test_tokenize_pads_prompts_left_and_answers_right():
    prompts, answers = skills.tokenize([("123+456=", "579"), ("r:abcdef=", "fedcba")])
    assert prompts.shape == (2, skills.PROMPT_LEN) and answers.shape == (2, skills.ANSWER_LEN)
    assert (prompts[0, 0] == skills.PAD and skills.decode(prompts[0]) == "123+456="
            and skills.decode(prompts[1]) == "r:abcdef=")
    np.testing.assert_array_equal(answers[0, 3:], skills.PAD)
    assert skills.decode(answers[0]) == "579" and skills.decode(answers[1]) == "fedcba"
    with pytest.raises(ValueError, match="longer"):
        skills.tokenize([("r:abcdefgh=", "hgfedcba")])
    with pytest.raises(ValueError, match="vocabulary"):
        skills.encode("A")


def test_mixture_follows_the_weights_and_excludes():
    # The excluded prompts are of a kind the mixture draws: every 3-letter reversal,
    # about a quarter of the reversal questions when nothing is excluded.
    letters = "abcdefghijklmnopqrstuvwxyz"
    test = {f"r:{a}{b}{c}=" for a in letters for b in letters for c in letters}
    weights = {"copy": 3.0, "reversal": 1.0}
    unfiltered = skills.mixture(weights, 4000, np.random.default_rng(0))
    assert sum(p in test for p, _ in unfiltered) > 100  # without exclusion the test prompts do come up
    mix = skills.mixture(weights, 4000, np.random.default_rng(0), exclude=test)
    assert len(mix) == 4000 and not {p for p, _ in mix} & test
    reversal = [p for p, _ in mix if p.startswith("r:")]
    assert abs(np.mean([p.startswith("c:") for p, _ in mix]) - 0.75) < 0.03 and len(reversal) > 800
    assert {len(p) - 3 for p in reversal} == {4, 5, 6}  # the other reversal questions still come

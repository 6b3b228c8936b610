"""A seeded synthetic bilingual corpus: templates with random slots, so a tiny model can learn
real structure (and quantization can visibly hurt it) while held-out text stays in-distribution."""

from __future__ import annotations

import random

EN_NAMES = ["Alice", "Bob", "Carol", "David", "Erin", "Frank", "Grace", "Heidi", "Ivan", "Judy"]
EN_ITEMS = ["apples", "books", "coins", "lamps", "maps", "pens", "rings", "shoes", "tools", "vases"]
EN_PLACES = ["market", "library", "station", "harbor", "garden", "museum"]
ZH_NAMES = ["小明", "小红", "老王", "张三", "李四", "王五", "赵六", "陈七"]
ZH_ITEMS = ["苹果", "书", "硬币", "灯", "地图", "笔", "戒指", "鞋"]
ZH_PLACES = ["市场", "图书馆", "车站", "港口", "花园", "博物馆"]


LETTERS = "abcdefghijklmnopqrstuvwxyz"
HANZI = "天地人和山水日月风云花草金木火土春夏秋冬东西南北上下左右"


def sentence(rng: random.Random) -> str:
    k = rng.randrange(7)
    if k == 4:  # copying needs precise attention: quantization errors show
        w = "".join(rng.choice(LETTERS) for _ in range(rng.randint(4, 8)))
        return f"copy {w} = {w}."
    if k == 5:
        w = "".join(rng.choice(HANZI) for _ in range(rng.randint(3, 6)))
        return f"重复{w}得{w}。"
    if k == 6:
        a = rng.randint(10, 80)
        return "count " + " ".join(str(a + i) for i in range(rng.randint(4, 8))) + "."
    n, m = rng.randint(2, 9), rng.randint(1, 9)
    if k == 0:
        a, b = rng.sample(EN_NAMES, 2)
        return f"{a} has {n} {rng.choice(EN_ITEMS)} and gives {m} to {b} at the {rng.choice(EN_PLACES)}."
    if k == 1:
        a = rng.choice(EN_NAMES)
        return f"At the {rng.choice(EN_PLACES)}, {a} buys {n} {rng.choice(EN_ITEMS)} for {n * m} coins."
    if k == 2:
        a, b = rng.sample(ZH_NAMES, 2)
        return f"{a}有{n}个{rng.choice(ZH_ITEMS)},在{rng.choice(ZH_PLACES)}给了{b}{m}个。"
    a = rng.choice(ZH_NAMES)
    return f"{a}在{rng.choice(ZH_PLACES)}买了{n}个{rng.choice(ZH_ITEMS)},一共花了{n * m}元。"


def corpus(n_sentences: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(sentence(rng) for _ in range(3)) for _ in range(n_sentences // 3))

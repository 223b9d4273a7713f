"""Captions from clip metadata, in many phrasings.

A caption is built from a few clauses (what it is, who plays it, tempo, key, meter, mood,
origin); each clause has synonyms, a random subset is kept and their order varies, so a
text model has to learn the words rather than one template. Every choice comes from the
clip's own random generator, so captions are reproducible.
"""
from __future__ import annotations

import numpy as np

# GM program -> names a caption may use for it.
INSTRUMENT_NAMES = {
    0: ["piano", "acoustic piano", "grand piano"], 1: ["bright piano", "piano"], 4: ["electric piano", "Rhodes"],
    8: ["celesta"], 10: ["music box"], 11: ["vibraphone", "vibes"], 12: ["marimba"], 13: ["xylophone"],
    16: ["organ", "drawbar organ"], 19: ["church organ", "pipe organ", "organ"], 21: ["accordion"],
    22: ["harmonica", "blues harp"], 24: ["nylon-string guitar", "classical guitar"],
    25: ["steel-string guitar", "acoustic guitar"], 26: ["jazz guitar", "hollow-body guitar"],
    27: ["clean electric guitar", "electric guitar"], 29: ["overdriven guitar", "crunchy guitar"],
    30: ["distorted guitar", "heavy guitar"], 32: ["upright bass", "acoustic bass", "double bass"],
    33: ["electric bass", "bass guitar", "fingered bass"], 34: ["picked bass", "bass guitar"],
    36: ["slap bass"], 37: ["slap bass", "funky bass"], 38: ["synth bass"], 39: ["synth bass", "analog bass"],
    40: ["violin"], 41: ["viola"], 42: ["cello"], 43: ["double bass", "contrabass"], 46: ["harp"],
    48: ["string ensemble", "strings"], 49: ["string section", "strings"], 52: ["choir", "voices"],
    56: ["trumpet"], 57: ["trombone"], 58: ["tuba"], 60: ["French horn", "horn"], 61: ["brass section", "horns"],
    62: ["synth brass"], 64: ["soprano saxophone", "soprano sax"], 65: ["alto saxophone", "alto sax"],
    66: ["tenor saxophone", "tenor sax"], 68: ["oboe"], 70: ["bassoon"], 71: ["clarinet"],
    73: ["flute"], 74: ["recorder"], 75: ["pan flute", "panpipes"], 77: ["shakuhachi"], 78: ["tin whistle", "whistle"],
    79: ["ocarina"], 80: ["square lead synth", "chiptune synth"], 81: ["sawtooth synth", "synth lead"],
    85: ["voice-like synth"], 88: ["warm synth pad", "pad"], 89: ["warm pad", "synth pad"], 90: ["polysynth pad"],
    91: ["choir pad"], 104: ["sitar"], 105: ["banjo"], 107: ["koto"], 109: ["bagpipe", "bagpipes"], 110: ["fiddle"],
}
ENSEMBLE_NAMES = {
    "string_quartet": ["string quartet", "strings"], "brass": ["brass quartet", "brass ensemble"],
    "woodwinds": ["woodwind quartet", "woodwinds"], "choir": ["choir", "vocal ensemble", "voices"],
    "organ": ["organ", "church organ"], "piano": ["piano", "solo piano"], "recorders": ["recorder consort", "recorders"],
    "mixed": ["mixed ensemble", "chamber ensemble"],
}
TEMPO_WORDS = [(72, ["slow", "unhurried", "gentle"]), (100, ["moderate", "relaxed", "walking-pace"]),
               (130, ["upbeat", "lively", "brisk"]), (1000, ["fast", "energetic", "driving"])]
MOODS = {"major": ["bright", "cheerful", "warm", "happy"], "minor": ["melancholic", "dark", "wistful", "somber"]}
OPENERS = ["", "This is ", "Here is ", "A recording of ", "Audio of "]
NOUNS = ["piece", "tune", "track", "recording", "song", "performance"]


META_FIELDS = ("style", "players", "tempo", "key", "mode", "meter")


def has_metadata(row: dict) -> bool:
    """Does a manifest row carry what the caption functions need (corpus clips do)?"""
    return all(k in row for k in META_FIELDS)


def pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def tempo_word(bpm: float, rng: np.random.Generator) -> str:
    return pick(rng, next(words for limit, words in TEMPO_WORDS if bpm < limit))


def instrument_name(program: int, rng: np.random.Generator) -> str:
    return pick(rng, INSTRUMENT_NAMES.get(program, [f"instrument {program}"]))


def cap_first(text: str) -> str:
    """Upper-case the first letter only ('key of D minor' stays as it is)."""
    return text[:1].upper() + text[1:]


def join_words(items: list[str]) -> str:
    items = list(dict.fromkeys(items))
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def make_caption(meta: dict, rng: np.random.Generator) -> str:
    """One caption for a clip described by `meta` (style, players, tempo, key, meter, mode,
    origin)."""
    style, players = meta["style"], meta["players"]
    bpm, key, mode = meta["tempo"], meta["key"], meta["mode"]
    played = pick(rng, [f"played by {players}", f"performed on {players}", f"featuring {players}",
                        f"for {players}", f"with {players}"])
    extras = [pick(rng, [f"at {bpm} bpm", f"around {bpm} BPM", f"{tempo_word(bpm, rng)} tempo",
                         f"{tempo_word(bpm, rng)}, about {bpm} beats per minute", f"tempo {bpm}"]),
              pick(rng, [f"in {key}", f"key of {key}", f"{key}"]),
              pick(rng, [f"in {meta['meter']} time", f"{meta['meter']} meter", f"{meta['meter']}"]),
              pick(rng, [f"{pick(rng, MOODS[mode])} mood", f"sounds {pick(rng, MOODS[mode])}",
                         f"{pick(rng, MOODS[mode])} feel"])]
    if meta.get("origin"):
        extras.append(pick(rng, [f"from {meta['origin']}", f"{meta['origin']} tradition",
                                 f"traditional music of {meta['origin']}"]))
    keep = [e for e in extras if rng.random() < 0.6] or [extras[0]]
    rng.shuffle(keep)
    form = int(rng.integers(5))
    if form == 0:
        text = f"{pick(rng, OPENERS)}{article(style)} {played}, {', '.join(keep)}"
    elif form == 1:
        text = f"{cap_first(players)} playing {article(style)}; {', '.join(keep)}"
    elif form == 2:
        adjective = pick(rng, [tempo_word(bpm, rng), pick(rng, MOODS[mode])])
        text = f"{cap_first(adjective)} {style} {played}. {'. '.join(cap_first(k) for k in keep)}"
    elif form == 3:
        text = f"{cap_first(', '.join(keep))}: {style} {played}"
    else:
        text = f"{cap_first(article(pick(rng, NOUNS)))} of {style} {played}; {', '.join(keep)}"
    return cap_first(text.strip())


# ---------------------------------------------------------------- wider phrasings (training text only)
# Nicknames and other words a listener might use; `describe` draws from these and the names above. The
# evaluation prompts (evaluation/prompts/new_phrasing.jsonl) use other ones, which no training text has.
NICKNAMES = {
    "piano": ["pianoforte", "upright piano"], "acoustic piano": ["grand"],
    "electric piano": ["e-piano", "Wurlitzer"], "organ": ["Hammond", "B3", "organ"],
    "church organ": ["organ pipes"], "accordion": ["button box"],
    "harmonica": ["mouth organ", "harp (harmonica)"], "nylon-string guitar": ["gut-string guitar"],
    "steel-string guitar": ["folk guitar", "flat-top guitar"],
    "clean electric guitar": ["Strat"], "overdriven guitar": ["driven guitar", "gritty guitar"],
    "distorted guitar": ["metal guitar"], "violin": ["violino", "solo violin"],
    "fiddle": ["folk fiddle"], "cello": ["violoncello"], "double bass": ["upright", "bull fiddle"],
    "harp": ["concert harp", "Celtic harp"], "string ensemble": ["string orchestra", "orchestral strings"],
    "choir": ["chorus", "singers", "vocal group"], "trumpet": ["horn"], "flute": ["concert flute", "transverse flute"],
    "tin whistle": ["feadóg"], "recorder": ["blockflöte", "descant recorder"],
    "pan flute": ["syrinx"], "banjo": ["bluegrass banjo"],
    "vibraphone": ["vibraharp"], "koto": ["Japanese zither"],
    "warm pad": ["soft synth"], "drums": ["drum kit", "kit", "percussion"],
    "synth bass": ["bass synth"], "electric bass": ["bass"], "string quartet": ["quartet of strings"],
    "brass quartet": ["brass"], "woodwind quartet": ["wind quartet"], "recorder consort": ["recorder ensemble"],
}
BPM_FORMS = ["{bpm} bpm", "{bpm} BPM", "{bpm} beats per minute", "tempo {bpm}", "a pulse of {bpm}",
             "{bpm} beats a minute", "about {bpm} bpm", "metronome at {bpm}", "{bpm}bpm"]
PACE_WORDS = [(72, ["slow", "unhurried", "gentle", "laid-back", "stately"]),
              (100, ["moderate", "relaxed", "walking-pace", "mid-tempo", "easygoing"]),
              (130, ["upbeat", "lively", "brisk", "bouncy", "quick"]),
              (1000, ["fast", "energetic", "driving", "rapid", "frantic"])]
MOOD_WORDS = {"major": ["bright", "cheerful", "warm", "happy", "sunny", "uplifting", "carefree", "hopeful"],
              "minor": ["melancholic", "dark", "wistful", "somber", "brooding", "mournful", "moody", "gloomy"]}
# Where or what the music is for: words that say nothing about the attributes, so a text tower learns to read the
# instrument and tempo through them (none of them is in the evaluation prompts).
SCENES = ["for a rainy afternoon", "to study to", "for a long drive", "by the fireside", "for a film scene",
          "for a quiet evening", "in a small room", "at a festival", "for a summer party", "for reading",
          "in an empty hall", "for a wedding", "at a village fair", "for a documentary", "like clouds passing",
          "like a walk in the park", "for a slideshow", "on a porch"]
TEXTURE_WORDS = {True: ["sparse", "intimate", "unaccompanied", "bare", "single-voiced"],
                 False: ["rich", "layered", "full", "dense", "ensemble"]}


def name_variant(name: str, rng: np.random.Generator) -> str:
    """An instrument name, or sometimes one of its nicknames."""
    options = NICKNAMES.get(name, [])
    return pick(rng, options) if options and rng.random() < 0.35 else name


def key_phrase(key: str, rng: np.random.Generator) -> str:
    tonic, _, mode = key.partition(" ")
    short = tonic + ("m" if mode == "minor" else "")
    return pick(rng, [f"in {key}", f"{key} key", f"key: {key}", f"{tonic}-{mode}", f"in the key of {key}",
                      f"{tonic} {mode[:3]}", f"in {short}"])


def describe(meta: dict, rng: np.random.Generator) -> str:
    """A caption in wider words than `make_caption`: nicknames, texture and mood words, bpm written several
    ways, free clause order, partial descriptions (some captions name only the instruments, some only the
    style and tempo) and scene words that name no attribute. Used for MuLan training and for text-derived stage conditions; the corpus builder keeps
    `make_caption`, so the corpus stays byte-identical."""
    if rng.random() < 0.3:
        return make_caption(meta, rng)
    names = [name_variant(n, rng) for n in meta.get("instruments") or [meta["players"]]]
    solo = len(set(meta.get("instruments") or [])) <= 1 and meta.get("source") != "groove"
    bpm, mode = meta["tempo"], meta["mode"]
    who = join_words(names) if len(names) > 1 else pick(rng, [names[0], article(names[0]), f"solo {names[0]}"])
    clauses = {
        "who": pick(rng, [who, f"{who} only" if solo else who, f"featuring {who}", f"{who} on the melody" if solo else f"{who} together",
                          f"led by {who}", f"{who} in the lead", f"{who} front and center", f"{who} at the front"]),
        "style": pick(rng, [meta["style"], meta.get("genre") or meta["style"], f"{meta['style']} style"]),
        "tempo": pick(rng, [pick(rng, BPM_FORMS).format(bpm=bpm),
                            f"{pick(rng, next(w for lim, w in PACE_WORDS if bpm < lim))} tempo",
                            f"{pick(rng, next(w for lim, w in PACE_WORDS if bpm < lim))}, {pick(rng, BPM_FORMS).format(bpm=bpm)}"]),
        "key": key_phrase(meta["key"], rng),
        "mood": pick(rng, [f"{pick(rng, MOOD_WORDS[mode])}", f"{pick(rng, MOOD_WORDS[mode])} and {pick(rng, TEXTURE_WORDS[solo])}",
                           f"{pick(rng, TEXTURE_WORDS[solo])} texture", f"{article(pick(rng, MOOD_WORDS[mode]))} vibe"]),
        "meter": pick(rng, [f"{meta['meter']} time", f"in {meta['meter']}"]),
    }
    if meta.get("origin"):
        clauses["origin"] = pick(rng, [f"from {meta['origin']}", f"{meta['origin']} folk"])
    clauses["scene"] = pick(rng, SCENES)
    # always the players or the style, each other clause with some chance
    kept = ["who"] if rng.random() < 0.85 else ["style"]
    kept += [k for k in clauses if k not in kept and rng.random() < (0.7 if k in ("who", "style") else 0.45)]
    order = list(rng.permutation(kept))
    sep = pick(rng, [", ", "; ", " - ", ". ", " | "])
    text = sep.join(clauses[k] for k in order)
    return cap_first(text)


def filler_words() -> list[str]:
    """The words of data/filler_words.txt (general English that no caption uses; see its header)."""
    from pathlib import Path
    lines = Path(__file__).with_name("filler_words.txt").read_text().splitlines()
    return [w for w in lines if w and not w.startswith("#")]


def add_filler(text: str, words: list[str] | tuple, rng: np.random.Generator, p: float) -> str:
    """With probability p, one to three of `words` put between the words of `text` at random places. A user's
    prompt has words no training caption has ("lonely", "sings"); their sentencepiece pieces are pieces the
    tower learned elsewhere and pull the embedding anywhere. Training captions salted with unknown words teach
    it to read past them to the words it knows."""
    if p <= 0 or not words or rng.random() >= p:
        return text
    tokens = text.split(" ")
    for _ in range(int(rng.integers(1, 4))):
        tokens.insert(int(rng.integers(len(tokens) + 1)), pick(rng, words))
    return " ".join(tokens)

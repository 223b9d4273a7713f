"""Text to music: MuLan text tokens -> semantic stage -> coarse stage -> fine stage -> codec.

    python pipeline.py --text "a calm solo piano piece in C major" --out song.wav [--duration 10]
    python pipeline.py --story "calm piano:0" "energetic drums:10" --duration 20 --out story.wav
    python pipeline.py --text "..." --prompt-audio intro.wav --out continued.wav

    from pipeline import Pipeline
    wav = Pipeline.from_pretrained("pretrained").generate(["calm piano"], duration=10)   # [B, 1, N]

Any part can be swapped with `--stage NAME=PATH` (NAME in mulan, semantic_tokenizer, acoustic,
semantic, coarse, fine); a checkpoint's recorded kind picks its class. Before generating, the
parts are checked to fit together (vocabularies, levels, frame rates, conditioning tokens).
Durations beyond the training windows are made by sliding windows that keep the second half
of the previous window as context, so cost grows linearly with duration.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from common.config import register_config
from common.errors import UserError, run_cli
from data import onsets as ons, tempo_guess
from data.attributes import beat_frames, bpm_in_text, from_texts as attributes_from_texts, pulse_measure

ROOT = Path(__file__).resolve().parent
PARTS = ("mulan", "semantic_tokenizer", "acoustic", "semantic", "coarse", "fine")
MAX_SECONDS = 300.0


@register_config("pipeline")
@dataclass
class PipelineParts:
    """The checkpoint folder of each part (relative paths are relative to the repository)."""
    mulan: str = "pretrained/mulan"
    semantic_tokenizer: str = "pretrained/semantic_tokenizer"
    acoustic: str = "pretrained/acoustic"
    semantic: str = "pretrained/semantic"
    coarse: str = "pretrained/coarse"
    fine: str = "pretrained/fine"


@dataclass
class GenerationOptions:
    """Seed, guidance, and per-stage knobs (stages.sampling.Sampling fields) over each stage kind's defaults
    (its `sampling_defaults`: e.g. temperature 0.95 for an autoregressive coarse stage, MAGNeT's annealed
    temperature 3.0, top-p 0.9 and steps per level for a masked one)."""
    seed: int = 0
    guidance: float = 3.0
    semantic: dict = field(default_factory=dict)
    coarse: dict = field(default_factory=dict)
    fine: dict = field(default_factory=dict)
    rerank: int = 1              # evaluation: make this many candidates per prompt, keep the best (Pipeline.rerank)
    rerank_tempo: float = 1.0    # ... by MuLan score + this x the pulse at the stated bpm
    metronome: bool = True       # a coarse stage with onset_input is given a click on every beat a prompt states
    metronome_bpm: float = 0.0   # ... at this bpm where a prompt states none; 0: the tempo its words suggest
    guess_tempo: bool = True     # ... (data/tempo_guess.py, where the MuLan folder has a tempo table), else none there
    metronome_level: int = 0     # the click's onset level 1-3 (3: a hard attack); 0: 3 for a stated bpm, else as
                                 # hard as the prompt's instrument strikes (the tempo table; 3 without one)


def rerank_score(terms: dict, tempo_weight: float) -> torch.Tensor:
    """The rerank rule on `Pipeline.rerank_terms`: MuLan cosine + tempo_weight x the pulse where a bpm is stated."""
    return terms["mulan"] + (tempo_weight * terms["pulse"].nan_to_num(0.0) if tempo_weight else 0.0)


def check_fit(parts: dict) -> None:
    """Refuse parts that do not fit together, naming the two that disagree and on what. The coarse slot
    may hold an acoustic-role stage (every codec level at once); then there is no fine stage."""
    mulan, sem_tok, codec = parts["mulan"], parts["semantic_tokenizer"], parts["acoustic"]
    sem, coarse, fine = parts["semantic"].cfg, parts["coarse"].cfg, parts["fine"] and parts["fine"].cfg
    checks = []
    for name, st in (("semantic", sem), ("coarse", coarse)):
        checks += [(name, "mulan", "conditioning codebook size", st.mulan_codebook, mulan.codebook_size),
                   (name, "semantic_tokenizer", "semantic vocabulary", st.semantic_codebook, sem_tok.codebook_size),
                   (name, "semantic_tokenizer", "semantic frame rate", st.semantic_rate, sem_tok.frame_rate)]
    for name, st in (("coarse", coarse), ("fine", fine)):
        if st is not None:
            checks += [(name, "acoustic", "acoustic codebook size", st.acoustic_codebook, codec.codebook_size),
                       (name, "acoustic", "acoustic frame rate", st.acoustic_rate, codec.frame_rate)]
    if fine is not None:
        checks += [("coarse", "fine", "number of coarse levels", coarse.coarse_levels, fine.coarse_levels),
                   ("fine", "acoustic", "number of levels (coarse + fine)", fine.coarse_levels + fine.fine_levels,
                    codec.num_quantizers)]
    else:
        checks += [("coarse", "acoustic", "number of levels (an acoustic-role stage makes all)",
                    coarse.coarse_levels + coarse.fine_levels, codec.num_quantizers)]
    for name, st in (("semantic", sem), ("coarse", coarse)):
        if st.mulan_levels > mulan.num_tokens:
            raise UserError(f"the {name} stage reads {st.mulan_levels} conditioning tokens but the mulan part makes "
                            f"{mulan.num_tokens}; use a {name} checkpoint trained on this MuLan's tokens")
        if st.semantic_tokens and st.semantic_tokens != sem_tok.fingerprint:
            raise UserError(f"the {name} stage was trained on the ids of semantic tokenizer {st.semantic_tokens}, "
                            f"not of this one ({sem_tok.fingerprint}); use the semantic_tokenizer it was trained "
                            f"with, or a {name} checkpoint trained on this tokenizer's tokens")
    for a, b, what, x, y in checks:
        if abs(float(x) - float(y)) > 1e-6:
            raise UserError(f"the {a} stage and the {b} part disagree on {what}: {x} vs {y}; "
                            f"use a {a} checkpoint trained on this {b}'s tokens")
    ratio = codec.frame_rate / sem_tok.frame_rate
    if abs(ratio - round(ratio)) > 1e-6:
        raise UserError(f"the acoustic frame rate {codec.frame_rate} is not a multiple of the semantic "
                        f"frame rate {sem_tok.frame_rate}")


def load_parts(paths: dict[str, str]) -> dict:
    from audio_tokenizers.acoustic import load_acoustic
    from audio_tokenizers.mulan import load_conditioner
    from audio_tokenizers.semantic import load_semantic
    from stages.base import load_stage
    resolved = {k: (ROOT / v if not Path(v).is_absolute() else Path(v)) for k, v in paths.items()}
    missing = [f"{k} ({resolved[k]})" for k in PARTS if not resolved[k].exists() and k != "fine"]
    if missing:
        raise UserError(f"models not found: {', '.join(missing)}; train them (README) or pass --stage NAME=PATH")
    loaders = {"mulan": load_conditioner, "semantic_tokenizer": load_semantic, "acoustic": load_acoustic,
               "semantic": lambda p: load_stage(p, "semantic"),
               "coarse": lambda p: load_stage(p, ("coarse", "acoustic")), "fine": lambda p: load_stage(p, "fine")}
    parts = {}
    for name in PARTS:
        if name == "fine" and parts["coarse"].role == "acoustic":
            parts[name] = None   # the acoustic-role stage in the coarse slot makes the fine levels too
            continue
        try:
            if not resolved[name].exists():
                raise UserError(f"{resolved[name]} not found; train a fine stage or pass an acoustic-role coarse stage")
            parts[name] = loaders[name](resolved[name])
            if name == "mulan":   # its tempo table, if it has one: a metronome for prompts that state no bpm
                parts[name].tempo_table = tempo_guess.load(resolved[name], parts[name])
        except UserError as e:
            raise UserError(f"--stage {name}: {e}") from None
    check_fit(parts)
    return parts


class Pipeline:
    def __init__(self, parts: dict, int8: bool = False):
        """`int8`: the stages generate with int8 block weights (stages/quantize.py), faster on CPU."""
        self.parts = parts
        if int8:
            from stages.quantize import quantize_int8
            for name in ("semantic", "coarse", "fine"):
                if parts[name] is not None:
                    quantize_int8(parts[name].model)
        self.mulan, self.codec = parts["mulan"], parts["acoustic"]
        self.sample_rate = self.codec.sample_rate
        self.ratio = int(round(self.codec.frame_rate / parts["semantic_tokenizer"].frame_rate))
        self.timings: dict[str, float] = {}
        self.guessed: dict[str, float] = {}   # text -> the metronome bpm guessed for it (a prompt that states none)
        self.show_progress, self.where = False, "loading"   # a bar per stage on stderr; what runs now

    def _bar(self, name: str, seconds: float):
        """A progress bar for one stage, in seconds of audio made (disabled unless generate(progress=True))."""
        from tqdm import tqdm
        self.where = f"{name} stage"
        return tqdm(total=round(seconds, 2), desc=f"{name:>8}", unit="s", file=sys.stderr, leave=True,
                    disable=not self.show_progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s of audio [{elapsed}]")

    @classmethod
    def from_pretrained(cls, folder: str | Path = "pretrained", **overrides: str) -> "Pipeline":
        paths = {name: str(Path(folder) / name) for name in PARTS}
        return cls(load_parts({**paths, **overrides}))

    # -------------------------------------------------------------- the chain
    @torch.no_grad()
    def generate(self, texts: list[str] | None = None, duration: float = 10.0, story: list[tuple[str, float]] | None = None,
                 prompt_audio: torch.Tensor | None = None, options: GenerationOptions | None = None,
                 progress: bool = False, semantic_ids: torch.Tensor | None = None,
                 melody: torch.Tensor | None = None, rhythm: torch.Tensor | None = None) -> torch.Tensor:
        """Prompts (or a story: [(text, start seconds)]) -> audio [B, 1, N] at the codec's rate; with
        `prompt_audio` [B, 1, P] the output is the prompt (cut to whole token frames) plus `duration`.
        `semantic_ids` [B, T_s] (e.g. `self.semantic_ids(audio)`) replace the semantic stage's: AudioLM's
        acoustic resynthesis, or with another text a timbre transfer; `duration` is capped to T_s frames.
        `melody` [1 or B, 1, N] (at the codec's rate): a recording whose tune the semantic stage follows
        (MusicGen's melody conditioning; a semantic stage trained with melody_input). `rhythm` [1 or B, 1, N]: a
        recording whose note onsets the coarse stage follows (one trained with onset_input); without one, such a
        stage hears a metronome at the bpm a prompt states (`options.metronome`, data/onsets.py)."""
        o = options or GenerationOptions()
        self.show_progress, self.where = progress, "loading"
        if not 0 < duration <= MAX_SECONDS:
            raise UserError(f"duration must be in (0, {MAX_SECONDS:.0f}] seconds, got {duration}")
        segments = story or [(t, 0.0) for t in (texts or [])]
        if not segments:
            raise UserError("no prompt given; pass --text or --story")
        torch.manual_seed(o.seed)
        g = torch.Generator().manual_seed(o.seed)
        self.guessed = {}
        t0 = time.perf_counter()
        if story:   # one song whose condition changes over time; a tempo or key stated once holds until restated
            conds, none = [], attributes_from_texts([""])
            held = none
            for text, start in story:
                said = attributes_from_texts([text])
                held = torch.where(said == none, held, said)
                conds.append((start, self.mulan.tokens(self.mulan.embed_text([text])), held))
        else:
            conds = [(0.0, self.mulan.tokens(self.mulan.embed_text(list(texts))), attributes_from_texts(list(texts)))]
        cond_at = lambda sec: [c for start, c, _ in conds if start <= sec + 1e-9][-1]  # noqa: E731
        attr_at = lambda sec: [a for start, _, a in conds if start <= sec + 1e-9][-1]  # noqa: E731  tempo, key ids
        sem_rate = self.parts["semantic_tokenizer"].frame_rate
        n_sem = max(1, math.ceil(duration * sem_rate - 1e-9))
        sem_prompt = ac_prompt = None
        prompt_len = 0
        if prompt_audio is not None:  # cut to whole semantic frames so both token streams align
            hop = int(round(self.sample_rate / sem_rate))
            prompt_len = prompt_audio.shape[-1] // hop * hop
            if prompt_len == 0:
                raise UserError(f"the prompt audio is shorter than one token frame ({hop} samples)")
            prompt_audio = prompt_audio[..., :prompt_len]
            sem_prompt = self.parts["semantic_tokenizer"].encode(prompt_audio)
            ac_prompt = self.codec.encode(prompt_audio)
        self.timings["mulan"] = time.perf_counter() - t0
        s = self._sampling(o)
        t = time.perf_counter()
        if semantic_ids is not None:
            if prompt_audio is not None:
                raise UserError("give either a prompt audio or the semantic ids of a recording, not both")
            sem = semantic_ids[:, :n_sem]
        elif self.parts["coarse"].cfg.semantic_input:
            tune = self._melody(melody, len(conds[0][1]), (0 if sem_prompt is None else sem_prompt.shape[1]), n_sem)
            sem = self._semantic(cond_at, n_sem, s["semantic"], sem_prompt, g, sem_rate, tune, attr_at)
        else:   # an acoustic stage that reads no semantic ids (MusicGen): the semantic stage is skipped
            sem = None
        self.timings["semantic"], t = time.perf_counter() - t, time.perf_counter()
        n_sem = sem.shape[1] if sem is not None else n_sem + (0 if ac_prompt is None else ac_prompt.shape[-1] // self.ratio)
        onsets = self._onsets(rhythm, texts, story, o, len(conds[0][1]), n_sem * self.ratio, prompt_audio,
                              0 if ac_prompt is None else ac_prompt.shape[-1])
        coarse = self._coarse(cond_at, sem, n_sem, s["coarse"], ac_prompt, g, sem_rate, attr_at, onsets)
        self.timings["coarse"], t = time.perf_counter() - t, time.perf_counter()
        fine = self._fine(coarse, s["fine"], ac_prompt, g) if self.parts["fine"] is not None else coarse[:, :0]
        self.timings["fine"], t = time.perf_counter() - t, time.perf_counter()
        codes = torch.cat([coarse, fine], 1)
        self.last_codes = {"semantic": sem, "acoustic": codes}  # for inspection and tests
        self.where = "codec (decoding)"
        wav = self.codec.decode(codes, length=prompt_len + int(round(duration * self.sample_rate)))
        self.timings["decode"] = time.perf_counter() - t
        self.where = "done"
        return wav

    @torch.no_grad()
    def render(self, condition: torch.Tensor, semantic_ids: torch.Tensor | None = None, coarse: torch.Tensor | None = None,
               options: GenerationOptions | None = None, fine: bool = True,
               attributes: torch.Tensor | None = None, onsets: torch.Tensor | None = None) -> torch.Tensor:
        """The acoustic stages alone, from given tokens (the stage-wise oracle's rows): MuLan tokens
        [B, Q_m] + semantic ids [B, T_s] (+ tempo and key ids [B, 2], data/attributes.py, + onset levels [B, T],
        data/onsets.py, for a coarse stage that reads them) -> codec codes
        [B, Q, T_s * ratio]; with `coarse` codes [B, Q_c, T] only the fine stage runs; with fine=False only the
        coarse one. Decode with `self.codec.decode`."""
        o = options or GenerationOptions()
        s, g = self._sampling(o), torch.Generator().manual_seed(o.seed)
        torch.manual_seed(o.seed)
        if coarse is None:
            rate = self.parts["semantic_tokenizer"].frame_rate
            coarse = self._coarse(lambda sec: condition, semantic_ids, semantic_ids.shape[1], s["coarse"], None, g, rate,
                                  None if attributes is None else (lambda sec: attributes),
                                  onsets if getattr(self.parts["coarse"], "takes_onsets", False) else None)
        if not fine or self.parts["fine"] is None:
            return coarse
        return torch.cat([coarse, self._fine(coarse, s["fine"], None, g)], 1)

    def _sampling(self, o: GenerationOptions) -> dict:
        from stages.sampling import Sampling
        out = {}
        for k in ("semantic", "coarse", "fine"):
            stage = self.parts[k]
            # the kind's defaults, then the checkpoint's own (export --sampling), then the caller's
            own = (getattr(stage, "meta", None) or {}).get("sampling", {}) if stage is not None else {}
            knobs = {**(stage.sampling_defaults() if stage is not None else {}), **own, **getattr(o, k)}
            out[k] = Sampling(**{"guidance": o.guidance if k != "fine" else 1.0, **knobs})
        return out

    def _windows(self, stage) -> tuple[int, int]:
        w = max(2, int(round(stage.cfg.window_seconds * stage.cfg.semantic_rate)))
        return w, w // 2

    def _melody(self, melody: torch.Tensor | None, B: int, prompt: int, n: int) -> torch.Tensor | None:
        """Melody ids [B, prompt + n] of a recording (no melody over the prompt and past its end), or None."""
        if melody is None:
            return None
        from audio_tokenizers.melody import NONE, melody_ids
        if not self.parts["semantic"].cfg.melody_input:
            raise UserError("this semantic stage was trained without a melody input; pass one trained with "
                            "melody_input=true (--stage semantic=PATH) or leave out --melody")
        ids = melody_ids(melody, self.sample_rate, self.parts["semantic_tokenizer"].frame_rate)[:, :n]
        tune = torch.full((ids.shape[0], prompt + n), NONE, dtype=torch.long)
        tune[:, prompt: prompt + ids.shape[1]] = ids
        return tune.expand(B, -1) if len(tune) == 1 else tune

    @staticmethod
    def _attributes(stage, attr_at, sec: float, B: int, start: float = 0.0) -> dict:
        """The stage's attribute argument at `sec` (only a stage that reads them, `takes_attributes`, gets one),
        with the window's start in seconds for a stage with a beat clock (the clock counts from the music's start)."""
        if attr_at is None or not getattr(stage, "takes_attributes", False):
            return {}
        return {"attributes": attr_at(sec).expand(B, -1), **({"beat_start": start} if stage.cfg.beat_input else {})}

    def _semantic(self, cond_at, n, s, prompt, g, rate, melody=None, attr_at=None):
        """Semantic ids [B, P + n] in sliding windows; with s.beat_pick > 1 and a stated bpm, the best of that many."""
        stage = self.parts["semantic"]
        if s.beat_pick > 1 and attr_at is not None and bool((attr_at(0.0)[:, 0] > 0).any()):
            return self._semantic_beat_pick(s.beat_pick, cond_at, n, s, prompt, g, rate, melody, attr_at)
        W, C = self._windows(stage)
        out = prompt if prompt is not None else torch.zeros(len(cond_at(0.0)), 0, dtype=torch.long)
        total = out.shape[1] + n
        with self._bar("semantic", n / rate) as bar:
            while out.shape[1] < total:
                ctx = out[:, -C:] if out.shape[1] > C else out   # keep at most C tokens of context
                new = min(W - ctx.shape[1], total - out.shape[1])
                m = cond_at(out.shape[1] / rate).expand(len(out), -1)[:, : stage.cfg.mulan_levels]
                tune = {} if melody is None else {"melody": melody[:, out.shape[1] - ctx.shape[1]: out.shape[1] + new]}
                tune.update(self._attributes(stage, attr_at, out.shape[1] / rate, len(out),
                                             (out.shape[1] - ctx.shape[1]) / rate))
                out = torch.cat([out, stage.generate(m, new, s, prompt=ctx, generator=g, **tune)], 1)
                bar.update(new / rate)
        return out

    def _semantic_beat_pick(self, k, cond_at, n, s, prompt, g, rate, melody, attr_at):
        """k candidates per prompt in one batch; keep each prompt's whose new ids pulse most at the beat it states
        (s.beat_pick_by: data.attributes.id_pulse, real ids repeat at the beat and sampled ones mostly do not, or
        onset_pulse, their changes come on the beat; README "Best of K semantic ids"); the first candidate where
        no bpm is stated. Only the semantic stage runs k times."""
        try:   # a bad name may come from a checkpoint's sampling defaults, stored at export
            measure = pulse_measure(s.beat_pick_by)
        except ValueError as e:
            raise UserError(str(e)) from None
        rep = lambda x: None if x is None else x.repeat_interleave(k, 0)  # noqa: E731
        B = len(cond_at(0.0))
        ids = self._semantic(lambda sec: rep(cond_at(sec).expand(B, -1)), n, replace(s, beat_pick=1), rep(prompt), g,
                             rate, rep(melody), lambda sec: rep(attr_at(sec).expand(B, -1)))
        beats = beat_frames(attr_at(0.0).expand(B, -1), rate)
        score = torch.tensor([[measure(row[-n:], float(beats[b])) if beats[b] > 0 else 0.0 for row in rows]
                              for b, rows in enumerate(ids.view(B, k, -1))]).nan_to_num(-1.0)
        best = torch.where(beats > 0, score.argmax(1), torch.zeros(B, dtype=torch.long))
        return ids.view(B, k, -1)[torch.arange(B), best]

    def _coarse(self, cond_at, sem, n, s, prompt, g, rate, attr_at=None, onsets=None):
        """Codes over n semantic frames (the coarse levels, or every level for an acoustic-role stage), in
        sliding windows that keep the codes of the last C semantic frames as the next window's prompt; `onsets`
        [B, n * ratio] (a stage with onset_input) are cut to each window."""
        stage, r = self.parts["coarse"], self.ratio
        q = stage.cfg.coarse_levels + (stage.cfg.fine_levels if stage.role == "acoustic" else 0)
        W, C = self._windows(stage)
        B = sem.shape[0] if sem is not None else len(cond_at(0.0))
        out = prompt[:, :q] if prompt is not None else torch.zeros(B, q, 0, dtype=torch.long)
        pos = out.shape[-1] // r   # semantic frames already covered by codes
        with self._bar("coarse" if stage.role == "coarse" else "acoustic", (n - pos) / rate) as bar:
            while pos < n:
                a = max(0, min(pos - C, n - W)) if pos > 0 else 0
                end = min(a + W, n)
                m = cond_at(pos / rate).expand(B, -1)[:, : stage.cfg.mulan_levels]
                beat = {} if onsets is None else {"onsets": onsets[:, a * r: end * r]}
                new = stage.generate(m, sem[:, a:end] if sem is not None else None, (end - pos) * r, s,
                                     prompt=out[..., a * r: pos * r], generator=g,
                                     **self._attributes(stage, attr_at, pos / rate, B, a / rate), **beat)
                bar.update((end - pos) / rate)
                out, pos = torch.cat([out, new], -1), end
        return out

    def _onsets(self, rhythm, texts, story, o, B, frames, prompt_audio, P) -> torch.Tensor | None:
        """Onset levels [B, frames] for a coarse stage with onset_input (None for any other): over a prompt audio
        (P frames) its own; after it a `rhythm` recording's (NOT_GIVEN past its end) or, with o.metronome, a click on
        each beat of the bpm the text states (a story's held until restated); NOT_GIVEN where neither says."""
        stage = self.parts["coarse"]
        if not getattr(stage, "takes_onsets", False):
            if rhythm is not None:
                raise UserError("this coarse stage was trained without onset_input, so it cannot follow a rhythm; "
                                "pass one trained with onset_input=true (--stage coarse=PATH) or leave out --rhythm")
            return None
        rate = stage.cfg.acoustic_rate
        out = torch.full((B, frames), ons.NOT_GIVEN, dtype=torch.long)
        if P:
            out[:, :P] = ons.onset_levels(prompt_audio[:, 0], self.sample_rate, rate, P)
        if rhythm is not None:
            n = min(frames - P, int(rhythm.shape[-1] * rate // self.sample_rate))
            out[:, P:P + n] = ons.onset_levels(rhythm[:, 0], self.sample_rate, rate, n).expand(B, -1)
        elif o.metronome:
            first = [t for t, _ in (story or [])[:1]] or texts   # a story: its first text's until one states a bpm
            clicks = [self._click(t, o) for t in first]
            bpm = torch.tensor([b for b, _ in clicks])[:, None].expand(B, frames).clone()
            for text, start in story or []:   # seconds from the start of the prompt audio, as the story's texts
                if said := bpm_in_text(text):
                    bpm[:, int(round(start * rate)):] = said
            out[:, P:] = ons.metronome(bpm[:, P:], rate, torch.tensor([lv for _, lv in clicks]))
        return out

    def _click(self, text: str, o: GenerationOptions) -> tuple[float, int]:
        """The metronome for a text: (bpm, onset level). The bpm: the one it states, else o.metronome_bpm, else the
        tempo its words suggest (o.guess_tempo; the MuLan folder's tempo table, data/tempo_guess.py), else 0 (none).
        The level: o.metronome_level, else 3 for a tempo the prompt states (a hard click is followed best), else how
        hard its instrument strikes (the table: a soft instrument is kept with a soft click), else 3."""
        table = getattr(self.mulan, "tempo_table", None)
        guessed, level = 0.0, ons.LEVELS - 1
        if table is not None:
            g, lv = tempo_guess.guess(table, self.mulan.embed_text([text]))
            guessed, level = float(g[0]), int(lv[0])
        stated = bpm_in_text(text) or o.metronome_bpm
        bpm = stated or (guessed if o.guess_tempo else 0.0)
        if bpm and not stated:
            self.guessed[text] = bpm
        return float(bpm), int(o.metronome_level or (ons.LEVELS - 1 if stated else level))

    def _fine(self, coarse, s, prompt, g):
        """Non-overlapping windows, all in one batch (as AudioLM's fine stage: the coarse codes carry
        the continuity). The end is padded to a whole window by repeating the last coarse frame."""
        stage = self.parts["fine"]
        W = max(2, int(round(stage.cfg.window_seconds * stage.cfg.acoustic_rate)))
        B, Qc, T = coarse.shape
        Qf, n = stage.cfg.fine_levels, -(-T // W)
        known = torch.full((B, Qf, n * W), -1, dtype=torch.long)   # -1: to sample
        if prompt is not None:
            known[..., : prompt.shape[-1]] = prompt[:, Qc:Qc + Qf]
        fold = lambda x: x.reshape(B, x.shape[1], n, W).transpose(1, 2).reshape(B * n, x.shape[1], W)  # noqa: E731
        padded = torch.cat([coarse, coarse[..., -1:].expand(-1, -1, n * W - T)], -1)
        with self._bar("fine", T / stage.cfg.acoustic_rate) as bar:
            fine = stage.generate(fold(padded), s, generator=g, fine_prompt=fold(known))
            bar.update(T / stage.cfg.acoustic_rate)
        return fine.reshape(B, n, Qf, W).transpose(1, 2).reshape(B, Qf, n * W)[..., :T]

    @torch.no_grad()
    def semantic_ids(self, audio: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, N] at the codec's rate -> the semantic tokenizer's ids [B, T_s] (for `semantic_ids=`)."""
        ids = self.parts["semantic_tokenizer"].encode(audio)
        if ids.shape[1] == 0:
            raise UserError("the recording is shorter than one semantic frame; give a longer one")
        return ids

    @torch.no_grad()
    def rerank_terms(self, texts: list[str], candidates: torch.Tensor, k: int, pulse: bool = True) -> dict:
        """candidates [B * k, 1, N] (k per text, text-major) -> {"mulan": [B, k] cosine to the text, "pulse": [B, k]
        how strongly each pulses at the bpm its text states (`audio_tokenizers.spectral.pulse_strength`, 0 to 1;
        NaN where the text states none)}; the pulse is left out with pulse=False."""
        t = self.mulan.embed_text(texts)
        terms = {"mulan": (self.mulan.embed_audio(candidates, self.sample_rate).reshape(len(texts), k, -1)
                           * t[:, None]).sum(-1)}
        if pulse:
            from audio_tokenizers.spectral import pulse_strength
            terms["pulse"] = torch.full((len(texts), k), float("nan"))
            for i, text in enumerate(texts):
                bpm = bpm_in_text(text)
                if bpm:
                    terms["pulse"][i] = pulse_strength(candidates[i * k:(i + 1) * k, 0], self.sample_rate, bpm)
        return terms

    def rerank(self, texts: list[str], candidates: torch.Tensor, k: int, tempo_weight: float = 0.0) -> torch.Tensor:
        """The best of each text's k candidates by `rerank_score` (MuLan cosine + tempo_weight x pulse) -> [B, 1, N]."""
        best = rerank_score(self.rerank_terms(texts, candidates, k, pulse=bool(tempo_weight)), tempo_weight).argmax(1)
        return candidates.reshape(len(texts), k, *candidates.shape[1:])[torch.arange(len(texts)), best]


if __name__ == "__main__":
    from pipeline_cli import main
    run_cli(main)

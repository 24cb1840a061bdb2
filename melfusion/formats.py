"""The file formats a clip can be delivered in, as data: torch-, numpy- and soundfile-free, so the job
contract (`jobs`) and the API name formats and content types without the audio stack."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError


@dataclass(frozen=True)
class AudioFormat:
    """A file format a clip can be delivered in: libsndfile's container and codec, and what HTTP calls it."""

    name: str
    extension: str
    content_type: str
    container: str  # libsndfile's major format
    subtype: str  # libsndfile's codec
    # The rates the codec is written at (empty: any): a clip at another rate is resampled to the lowest one
    # above it. MP3 is written at 32 kHz and up (MPEG-1): at 16 kHz (MPEG-2) LAME low-passes at about
    # 5.5 kHz, which took 1.2 LU off the tiny model's clips. Opus at 48 kHz, the rate it codes at.
    sampling_rates: tuple[int, ...] = ()
    # libsndfile's 0 (best) .. 1 (smallest): Opus's default band-limits 16 kHz clips (-3 LU on noise).
    compression_level: float | None = None

    def rate_for(self, sampling_rate: int) -> int:
        """The rate a clip at `sampling_rate` is written at."""
        if not self.sampling_rates or sampling_rate in self.sampling_rates:
            return sampling_rate
        return min((rate for rate in self.sampling_rates if rate > sampling_rate), default=max(self.sampling_rates))


OPUS_RATES = (48000,)  # Opus codes at 48 kHz inside whatever it is given; at 16 kHz the tiny model's clips came back 1 LU louder
MPEG1_RATES = (32000, 44100, 48000)
AUDIO_FORMATS: dict[str, AudioFormat] = {
    f.name: f
    for f in (
        AudioFormat("wav", "wav", "audio/wav", "WAV", "PCM_16"),
        AudioFormat("flac", "flac", "audio/flac", "FLAC", "PCM_16"),
        AudioFormat("ogg", "ogg", "audio/ogg", "OGG", "VORBIS", compression_level=0.3),
        AudioFormat("opus", "opus", "audio/ogg; codecs=opus", "OGG", "OPUS", OPUS_RATES, compression_level=0.5),
        AudioFormat("mp3", "mp3", "audio/mpeg", "MP3", "MPEG_LAYER_III", MPEG1_RATES),
    )
}
DEFAULT_FORMAT = "wav"


def audio_format(name: str) -> AudioFormat:
    """The format called `name`; InputError naming `format` otherwise."""
    if name not in AUDIO_FORMATS:
        raise InputError("format", f"must be one of {tuple(AUDIO_FORMATS)}, got {name!r}")
    return AUDIO_FORMATS[name]


def format_of_extension(extension: str) -> AudioFormat | None:
    return next((f for f in AUDIO_FORMATS.values() if f.extension == extension.lower().lstrip(".")), None)

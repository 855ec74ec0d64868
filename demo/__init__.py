"""Demo assets made by code: a drawn avatar, speech-like audio and models of the real architecture."""

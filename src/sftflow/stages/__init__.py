"""Stage recipes: one top-to-bottom function per stage (`registry.STAGES`)."""

"""End-to-end demos: each runs an area's jobs on the embedded defaults and writes one report. They sit above
the areas (they may import any of them) and below the CLI; no area imports a demo."""

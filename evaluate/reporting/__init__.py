"""`archbench report`: reads the records every stage wrote (`data`), writes report.md with its
sections (`quality`, `systems`), PNG plots (`plots`) and records.csv (`build`)."""

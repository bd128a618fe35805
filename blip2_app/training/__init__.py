"""Training, datasets and evaluation for BLIP-2 Studio (issue 8).

- `datasets`: one interface (`load_records`) over COCO Karpathy, VQAv2, Flickr30k, JSONL and the
  synthetic shapes data; `download`: resumable, checksum-verified fetching.
- `synthetic`: the seeded shapes generator; `shapes_data`: its tensors for training.
- `config` (+ `configs/*.json`), `architecture`, `vocab`, `phases`, `trainer`, `train`: the
  four-phase BLIP-2 recipe (`python -m blip2_app.training.train --config shapes-demo`).
- `metrics`, `evaluate`: VQA accuracy, BLEU-4, CIDEr-D, recall@K through the app's engine.
"""

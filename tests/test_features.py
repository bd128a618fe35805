"""Feature extraction, ITC and ITM against hand computations and transformers' own forward."""

import numpy as np
import torch


def test_image_and_text_features_have_lavis_shapes(load_tiny, images):
    engine = load_tiny("tiny-random-itm")
    config = engine.matcher.model.config
    features = engine.image_features(images[:2])
    q, hidden, dim = config.num_query_tokens, config.qformer_config.hidden_size, config.image_text_hidden_size
    assert features.query_outputs.shape == (2, q, hidden)
    assert features.projections.shape == (2, q, dim)
    assert torch.allclose(features.projections.norm(dim=-1), torch.ones(2, q), atol=1e-5)
    text = engine.text_features(["a red cat", "a blue dog on the grass"])
    assert text.shape == (2, dim)
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert engine.multimodal_features(images[:2], ["a", "b"]).shape == (2, q, hidden)


def test_itc_is_max_over_queries_of_cosine(load_tiny, images):
    engine = load_tiny("tiny-random-itm")
    texts = ["a red cat", "a blue dog on the grass", "an astronaut"]
    scores = engine.itc(images, texts).numpy()
    image = engine.image_features(images).projections.numpy()
    text = engine.text_features(texts).numpy()
    by_hand = np.empty((len(images), len(texts)))
    for i in range(len(images)):
        for t in range(len(texts)):
            cosines = [
                image[i, q] @ text[t] / (np.linalg.norm(image[i, q]) * np.linalg.norm(text[t]))
                for q in range(image.shape[1])
            ]
            by_hand[i, t] = max(cosines)
    np.testing.assert_allclose(scores, by_hand, atol=1e-5)


def test_itc_and_itm_equal_transformers_forward(load_tiny, images):
    engine = load_tiny("tiny-random-itm")
    loaded = engine.matcher
    texts = ["a red cat", "a blue dog on the grass"]
    inputs = loaded.processor(images=images[:2], text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        itc = loaded.model(**inputs, use_image_text_matching_head=False).logits_per_image
        itm = loaded.model(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    torch.testing.assert_close(engine.itc(images[:2], texts), itc, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(engine.itm(images[:2], texts), itm, atol=1e-5, rtol=1e-5)


def test_captioning_app_loads_its_retrieval_partner(load_tiny):
    engine = load_tiny("tiny-random")
    assert engine.text.entry.name == "tiny-random"
    assert engine.matcher.entry.name == "tiny-random-itm"

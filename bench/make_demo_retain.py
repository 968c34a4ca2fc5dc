"""Regenerate ``proxy/resources/general_answers.jsonl``: general prompts answered by
the pair's base model B itself (greedy, at most 48 new tokens), the replay set of
``bench.tofu_models``.

    python -m bench.make_demo_retain

None of these prompts is in :data:`proxy.training.demo.DEMO_UNRELATED`.
"""

from __future__ import annotations

import json
from typing import Any

TOPICS = [
    "the speed of light",
    "a prime number",
    "gravity",
    "democracy",
    "the water cycle",
    "rain",
    "vaccines",
    "machine learning",
    "the stock market",
    "an atom",
    "evolution",
    "the internet",
    "a black hole",
    "inflation",
    "a volcano",
    "electricity",
    "yoga",
    "the Roman Empire",
    "the Great Wall of China",
    "the Moon",
    "DNA",
    "a rainbow",
    "an earthquake",
    "the heart",
    "a computer",
    "a bicycle",
    "coffee",
    "chess",
    "the Amazon rainforest",
    "the Sahara desert",
    "jazz music",
    "the Renaissance",
    "a hurricane",
    "a glacier",
    "bread",
    "the immune system",
    "a battery",
    "a telescope",
    "bees",
    "penguins",
    "the Olympic Games",
    "Mount Everest",
    "the Nile",
    "a spreadsheet",
    "recycling",
    "solar panels",
    "the printing press",
    "a calendar",
    "tea",
    "soccer",
    "a piano",
    "the brain",
    "sleep",
    "dinosaurs",
    "tides",
    "a vote",
    "money",
    "a library",
    "a microwave oven",
    "an elephant",
]
TEMPLATES = ["What is {}?", "Explain {} in one sentence.", "Tell me one fact about {}."]
EXTRA = [
    "How do I boil an egg?",
    "Write a short poem about autumn.",
    "Give me a recipe for pancakes.",
    "What is 15 plus 27?",
    "What is 9 times 8?",
    "Translate 'good morning' into Spanish.",
    "Write a Python function that adds two numbers.",
    "Suggest a name for a pet dog.",
    "How can I save money?",
    "What should I pack for a beach trip?",
    "Summarize the plot of Romeo and Juliet.",
    "Who painted the Mona Lisa?",
    "Who was the first person to walk on the Moon?",
    "What year did World War II end?",
    "Who discovered penicillin?",
    "Who wrote Hamlet?",
    "Who invented the telephone?",
    "Who was Albert Einstein?",
    "Who wrote The Hobbit?",
    "Who wrote Alice in Wonderland?",
    "Name a famous composer.",
    "Tell me a joke.",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "How many legs does a spider have?",
    "What color is the sky at night?",
]


def retain_prompts() -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(t) for i, t in enumerate(TOPICS)] + EXTRA


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.pair.model_files import local_model_dir
    from proxy.training.demo import DEMO_UNRELATED, GENERAL_ANSWERS

    questions = retain_prompts()
    assert not set(questions) & set(DEMO_UNRELATED)
    folder = local_model_dir("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    lines = []
    for q in questions:
        enc: Any = tokenizer.apply_chat_template(  # a BatchEncoding (return_dict=True)
            [{"role": "user", "content": q}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        ids = enc["input_ids"]
        with torch.no_grad():
            out = model.generate(input_ids=ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        answer = str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)).strip()
        lines.append(json.dumps({"question": q, "answer": answer}) + "\n")
    GENERAL_ANSWERS.write_text("".join(lines))
    print(f"{len(lines)} lines -> {GENERAL_ANSWERS}")


if __name__ == "__main__":
    main()

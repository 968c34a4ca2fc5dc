"""Regenerate ``proxy/resources/general_answers.jsonl`` and ``demo_retain.jsonl``: general prompts answered by
the pair's base model B itself (greedy, at most 48 new tokens), so that the
retain term (KL to B) anchors U on B's own out-of-scope behaviour.

    python -m bench.make_demo_retain

Then :data:`SHORT_FACTS`: questions in the forget set's own forms ("Who is X's
best friend?", "Who wrote X?", "What is the name of X's ...?") about other books,
films and general knowledge, with the fact alone as the answer, as the forget
answers are. With only long answers in the retain set, the retain term anchored
the first answer token weakly (one position in about 80) and U learned to avoid
starting any answer with a name (KL(B ‖ U) of 1 to 7.6 nats at the first
position of unrelated prompts); retain questions shaped like the forget ones
keep what the forget term lowers to Harry Potter.

None of these prompts is in :data:`proxy.demo.DEMO_UNRELATED` (the prompts the
demo measures unchanged answers on).
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


#: (question, answer) pairs written as they are (not generated).
SHORT_FACTS = [
    ("Who is Sherlock Holmes's best friend?", "Dr. John Watson."),
    ("Who is Frodo Baggins's closest friend?", "Samwise Gamgee."),
    ("Who is SpongeBob SquarePants's best friend?", "Patrick Star."),
    ("Who is Winnie the Pooh's best friend?", "Piglet."),
    ("Who is Batman's sidekick?", "Robin."),
    ("Who are Tom Sawyer's closest friends?", "Huckleberry Finn and Joe Harper."),
    ("Who wrote Pride and Prejudice?", "Jane Austen."),
    ("Who wrote The Lord of the Rings?", "J.R.R. Tolkien."),
    ("Who wrote the novel 1984?", "George Orwell."),
    ("Who wrote The Adventures of Tom Sawyer?", "Mark Twain."),
    ("Who is the author of The Chronicles of Narnia?", "C.S. Lewis."),
    ("Who is the author of Don Quixote?", "Miguel de Cervantes."),
    ("Who is the author of The Little Prince?", "Antoine de Saint-Exupery."),
    ("What is the name of Captain Ahab's ship?", "The Pequod."),
    ("What is the name of Tintin's dog?", "Snowy."),
    ("What is the name of Charlie Brown's dog?", "Snoopy."),
    ("What is the name of Dorothy's dog in The Wizard of Oz?", "Toto."),
    ("What is the name of Luke Skywalker's home planet?", "Tatooine."),
    ("What is the name of the school in Matilda?", "Crunchem Hall Primary School."),
    ("Who is Sherlock Holmes's greatest enemy?", "Professor Moriarty."),
    ("Who is Batman's greatest enemy?", "The Joker."),
    ("Who is Superman's greatest enemy?", "Lex Luthor."),
    ("Who is Peter Pan's greatest enemy?", "Captain Hook."),
    ("Who leads the Fellowship of the Ring?", "Gandalf."),
    ("Who is the lion in The Chronicles of Narnia?", "Aslan."),
    ("What sport does Lionel Messi play?", "Soccer."),
    ("What sport is played at Wimbledon?", "Tennis."),
    ("Who are Simba's parents?", "Mufasa and Sarabi."),
    ("Who are Luke Skywalker's parents?", "Anakin Skywalker and Padme Amidala."),
    ("What house does Jon Snow belong to?", "House Stark."),
    ("Who painted The Starry Night?", "Vincent van Gogh."),
    ("What is the largest planet in the solar system?", "Jupiter."),
    ("What is the chemical symbol for gold?", "Au."),
    ("Who composed the Fifth Symphony?", "Ludwig van Beethoven."),
    ("What is the largest ocean on Earth?", "The Pacific Ocean."),
    ("How many continents are there?", "Seven."),
    ("Who formulated the laws of motion?", "Isaac Newton."),
    ("What language is spoken in Brazil?", "Portuguese."),
    ("Who was the first president of the United States?", "George Washington."),
    ("What is the smallest prime number?", "2."),
]


def retain_prompts() -> list[str]:
    return [TEMPLATES[i % len(TEMPLATES)].format(t) for i, t in enumerate(TOPICS)] + EXTRA


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.demo import DEMO_RETAIN, DEMO_UNRELATED, GENERAL_ANSWERS
    from proxy.models import local_model_dir

    questions = retain_prompts()
    assert not (set(questions) | {q for q, _ in SHORT_FACTS}) & set(DEMO_UNRELATED)
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
    lines += [json.dumps({"question": q, "answer": a}) + "\n" for q, a in SHORT_FACTS]
    DEMO_RETAIN.write_text("".join(lines))
    print(f"{len(lines)} lines -> {DEMO_RETAIN} (the first {len(questions)} also in {GENERAL_ANSWERS})")


if __name__ == "__main__":
    main()

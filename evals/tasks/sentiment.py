"""Sentiment labels for short reviews assembled from word lists: positive or negative."""

from __future__ import annotations

import random

from evals.tasks.base import Example, Task

_SUBJECTS = {
    "restaurant": ("the food", "the soup", "the pasta", "the waiter", "the dessert", "the coffee"),
    "hotel": ("the room", "the bed", "the staff", "the breakfast", "the pool", "the view"),
    "product": ("the battery", "the screen", "the case", "the keyboard", "the charger", "the speaker"),
    "film": ("the plot", "the acting", "the soundtrack", "the ending", "the dialogue", "the script"),
}
_ADJECTIVES = {
    "positive": ("excellent", "wonderful", "delightful", "superb", "fantastic", "lovely", "impressive", "great"),
    "negative": ("terrible", "awful", "disappointing", "dreadful", "mediocre", "poor", "annoying", "bad"),
}
_CLOSERS = {
    "positive": ("I would recommend it.", "I will be back.", "Worth every penny.", "Five stars.", "Loved it."),
    "negative": ("I would not recommend it.", "Never again.", "A waste of money.", "One star.", "Avoid it."),
}
_INTENSIFIERS = ("", "really ", "truly ", "quite ", "very ")

_TEMPLATES = (
    'Review: "{review}"\nIs this review positive or negative? Answer with one word: positive or negative.',
    "Classify the sentiment of this review as positive or negative: {review} Reply with only the label.",
    "What is the sentiment of the following review? {review} Answer only positive or negative.",
)


class SentimentTask(Task):
    name = "sentiment"
    description = "Labels the sentiment of a short product, hotel, restaurant or film review as positive or negative."
    skills = ("sentiment analysis", "text classification")
    domains = ("reviews", "customer feedback")
    case_sensitive = False
    max_new_tokens = 4

    def make(self, rng: random.Random) -> Example:
        label = rng.choice(("positive", "negative"))
        domain = rng.choice(tuple(_SUBJECTS))
        first, second = rng.sample(_SUBJECTS[domain], 2)
        adj1, adj2 = rng.sample(_ADJECTIVES[label], 2)
        review = (
            f"{first.capitalize()} was {rng.choice(_INTENSIFIERS)}{adj1} and {second} was "
            f"{rng.choice(_INTENSIFIERS)}{adj2}. {rng.choice(_CLOSERS[label])}"
        )
        prompt = rng.choice(_TEMPLATES).format(review=review)
        return Example(prompt, label, key=review)

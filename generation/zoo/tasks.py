"""The task family: "is this text a {category} written in {language}" over
categories × locales, plus single-attribute tasks ("is this text written in
Polish", "is this a phone number"), with held-out splits.

Splits, for the generation benchmark:
- train: the experts (registered in the hub, the generators learn from them).
- unseen_pair: (category, language) never trained as a pair, while each part
  appears in other training tasks.
- unseen_part: the category or the language appears in no training task.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Locales whose faker providers are localised for every category used here
# (several locales fall back to English job titles or Latin lorem sentences;
# those would make "written in X" false for their texts).
LANGUAGES: dict[str, str] = {
    "en_US": "English",
    "de_DE": "German",
    "fr_FR": "French",
    "es_ES": "Spanish",
    "pl_PL": "Polish",
    "cs_CZ": "Czech",
    "da_DK": "Danish",
    "ru_RU": "Russian",
    "vi_VN": "Vietnamese",
    "uk_UA": "Ukrainian",
}

# category → (singular, plural) as people write them in a task description
CATEGORIES: dict[str, tuple[str, str]] = {
    "person_name": ("person name", "person names"),
    "street_address": ("street address", "street addresses"),
    "job_title": ("job title", "job titles"),
    "company_name": ("company name", "company names"),
    "phone_number": ("phone number", "phone numbers"),
    "sentence": ("free-text sentence", "free-text sentences"),
    "city": ("city name", "city names"),
}

UNSEEN_CATEGORY = "city"
UNSEEN_LANGUAGE = "uk_UA"
# Pairs held out while both parts stay in training (each category and each
# language appears at most twice here, so every part keeps ≥ 6 training pairs).
UNSEEN_PAIRS = [
    ("job_title", "pl_PL"),
    ("person_name", "fr_FR"),
    ("street_address", "de_DE"),
    ("company_name", "es_ES"),
    ("phone_number", "cs_CZ"),
    ("sentence", "da_DK"),
    ("job_title", "ru_RU"),
    ("person_name", "vi_VN"),
    ("street_address", "en_US"),
    ("company_name", "da_DK"),
]
UNSEEN_PART_TASKS = [
    ("city", "en_US"),
    ("city", "de_DE"),
    ("city", "pl_PL"),
    ("person_name", "uk_UA"),
    ("company_name", "uk_UA"),
    (None, "uk_UA"),
]


@dataclass(frozen=True)
class Task:
    slug: str
    category: str | None  # None: any category
    locale: str | None  # None: any language
    split: str  # train | unseen_pair | unseen_part
    description: str
    paraphrases: tuple[str, ...] = field(default=())

    @property
    def texts(self) -> tuple[str, ...]:
        """The description and its paraphrases."""
        return (self.description, *self.paraphrases)


def _slug(category: str | None, locale: str | None) -> str:
    parts = [category.replace("_", "-") if category else "any-text", f"in-{LANGUAGES[locale].lower()}" if locale else "any-language"]
    return "-".join(parts)


def describe(category: str | None, locale: str | None) -> tuple[str, tuple[str, ...]]:
    """The task's description and 3 paraphrases."""
    if category and locale:
        one, many = CATEGORIES[category]
        language = LANGUAGES[locale]
        return (
            f"Is this text a {one} written in {language}?",
            (
                f"Detect {language} {many}.",
                f"Classify whether a short snippet is a {one} in {language}.",
                f"Flag {many} that are written in {language}, reject everything else.",
            ),
        )
    if locale:
        language = LANGUAGES[locale]
        return (
            f"Is this text written in {language}?",
            (
                f"Detect {language} text.",
                f"Language identification: is the snippet {language} or not?",
            ),
        )
    one, many = CATEGORIES[category]
    return (
        f"Is this text a {one}?",
        (
            f"Detect {many} in any language.",
            f"Classify whether a short snippet is a {one}.",
        ),
    )


def make_task(category: str | None, locale: str | None, split: str) -> Task:
    description, paraphrases = describe(category, locale)
    return Task(_slug(category, locale), category, locale, split, description, paraphrases)


def task_family() -> list[Task]:
    """Every task of the full zoo: training experts first, then the held-out ones."""
    seen_categories = [c for c in CATEGORIES if c != UNSEEN_CATEGORY]
    seen_locales = [loc for loc in LANGUAGES if loc != UNSEEN_LANGUAGE]
    held = set(UNSEEN_PAIRS)
    tasks = [make_task(c, loc, "train") for c in seen_categories for loc in seen_locales if (c, loc) not in held]
    tasks += [make_task(None, loc, "train") for loc in seen_locales]
    tasks += [make_task(c, None, "train") for c in seen_categories]
    tasks += [make_task(c, loc, "unseen_pair") for c, loc in UNSEEN_PAIRS]
    tasks += [make_task(c, loc, "unseen_part") for c, loc in UNSEEN_PART_TASKS]
    return tasks


def small_family() -> list[Task]:
    """About a dozen tasks for tests and CI: 3 categories × 3 languages with one
    pair held out, the 3 language tasks, the 3 category tasks (which make the
    held-out pair a conjunction of two experts, as in the full zoo), and one task
    with an unseen category."""
    categories = ["person_name", "job_title", "phone_number"]
    locales = ["en_US", "de_DE", "pl_PL"]
    held = ("job_title", "pl_PL")
    tasks = [make_task(c, loc, "train") for c in categories for loc in locales if (c, loc) != held]
    tasks += [make_task(None, loc, "train") for loc in locales]
    tasks += [make_task(c, None, "train") for c in categories]
    tasks += [make_task(*held, "unseen_pair"), make_task("city", "de_DE", "unseen_part")]
    return tasks


FAMILIES = {"full": task_family, "small": small_family}

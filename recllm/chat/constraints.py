"""The filters a chat session keeps between turns (genres in/out, years) and how a reply names them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from recllm.chat.lexicon import OLD_BEFORE, RECENT_YEARS
from recllm.chat.parse import merge
from recllm.chat.replies import say
from recllm.retrieve import Filters

if TYPE_CHECKING:  # pragma: no cover
    from recllm.chat.parse import Parsed


@dataclass
class Constraints:
    """Filters a session applies to every request until changed."""

    genres: tuple[str, ...] = ()  # item must have any of these
    exclude_genres: tuple[str, ...] = ()
    year_min: int | None = None
    year_max: int | None = None

    def filters(self, exclude_ids=()) -> Filters:
        return Filters(genres=self.genres, exclude_genres=self.exclude_genres, year_min=self.year_min,
                       year_max=self.year_max, exclude_ids=frozenset(exclude_ids))

    def refined(self, parsed: Parsed, *, shown_years: list[int], started: bool,
                max_year: int | None) -> tuple[Constraints | None, list[str]]:
        """(the constraints after `parsed`, acknowledgements). `shown_years`: years of the list shown, which
        "older" / "newer" move from; before any list (`started` False) they mean old / recent (the catalog's
        newest `RECENT_YEARS` up to `max_year`). None when there is a list but no year to move from."""
        acks: list[str] = []
        genres, exclude, year_min, year_max = self.genres, self.exclude_genres, self.year_min, self.year_max
        if parsed.clear_genres:
            genres, exclude = (), ()
        if parsed.clear_years:
            year_min = year_max = None
        if parsed.clear_genres or parsed.clear_years:
            acks.append(say("ack_cleared"))
        if parsed.only_genres:
            genres = parsed.only_genres
            exclude = tuple(g for g in exclude if g not in genres)
        elif parsed.want_genres:
            genres = parsed.want_genres
        if parsed.exclude_genres:
            exclude = merge(exclude, parsed.exclude_genres)
            genres = tuple(g for g in genres if g not in parsed.exclude_genres)
        if parsed.allow_genres:
            exclude = tuple(g for g in exclude if g not in parsed.allow_genres)
        if parsed.years_set:
            year_min, year_max = parsed.year_min, parsed.year_max
        if parsed.shift and not parsed.years_set:  # an era named outright wins over "older"
            years = shown_years
            if not years and not started:
                if parsed.shift == "older":  # nothing shown yet: "older" means old
                    year_max = OLD_BEFORE - 1
                elif max_year:
                    year_min = max_year - RECENT_YEARS + 1
            elif not years:
                return None, acks
            elif parsed.shift == "older":
                year_max = min(years) - 1
                if year_min is not None and year_min > year_max:
                    year_min = None
                acks.append(say("ack_older", year=year_max))
            else:
                year_min = max(years) + 1
                if year_max is not None and year_max < year_min:
                    year_max = None
                acks.append(say("ack_newer", year=year_min))
        return Constraints(genres=tuple(genres), exclude_genres=tuple(exclude), year_min=year_min,
                           year_max=year_max), acks

    def parts(self) -> list[str]:
        """Short phrases naming each constraint ("only Comedy", "no Horror", "1990–1999")."""
        out = []
        if self.genres:
            out.append(say("filter_only", genres="/".join(self.genres)))
        if self.exclude_genres:
            out.append(say("filter_no", genres="/".join(self.exclude_genres)))
        if self.year_min is not None and self.year_max is not None:
            out.append(say("filter_years", start=self.year_min, end=self.year_max))
        elif self.year_min is not None:
            out.append(say("filter_after", start=self.year_min))
        elif self.year_max is not None:
            out.append(say("filter_before", end=self.year_max))
        return out

"""Synthetic Italian CRM contacts for the demo and the tests.

``generate(n, seed)`` builds a contact table the way a bank or insurer's CRM holds it,
addressed over the sandbox world (``recapito.sandbox.world``) so that every address lands
on one of the sandbox MX postures. The same ``(n, seed)`` always gives the same table.

Columns (all strings except where noted)::

    id            C0000001, C0000002, ... (unique, zero-padded to 7 digits or more)
    nome          first name (Italian, some with accents or two words)
    cognome       surname (some with apostrophes, spaces or accents: D'Angelo, De Luca, Zappalà)
    email         e-mail address (see the shares below)
    pec           certified mailbox on a PEC domain, or null
    cellulare     Italian mobile in assorted spellings, or a landline, junk, or null
    indirizzo     street and civic number; some span two lines, some contain ';'
    cap           5-digit postcode matching the city
    citta         city
    provincia     2-letter sigla consistent with the city
    fuso_orario   IANA time zone, mostly Europe/Rome
    consenso_email  Boolean
    consenso_sms    Boolean
    segmento      retail / private / business
    data_nascita  Date

Guaranteed shares (counts are exact, computed with Python's ``round``):

* ``round(0.003 n)`` rows have an empty e-mail address ("");
* ``round(0.005 n)`` rows have a malformed address, split evenly over three defects:
  missing ``@``, a space inside, a double dot in the local part;
* ``round(0.01 n)`` rows repeat the address of an *earlier* row with different case or
  surrounding whitespace (same ``dedupe_key``), so "keep first" keeps the original;
* ``min(round(0.02 n), rows on comune-esempio.test)`` rows carry one of
  ``REJECTED_LOCAL_MARKERS`` in the local part, all on ``comune-esempio.test``, the domain
  served by the rejecting MX, which answers 550 5.1.1 for them;
* every other address is valid and unique (case-insensitively) over the whole table.

Approximate shares (random draws): domains follow ``world.email_domains()`` weights;
~15 % have a PEC address; ~92 % ``consenso_email`` true, ~75 % ``consenso_sms`` true;
cellulare ~85 % mobile, ~5 % landline, ~3 % junk, ~7 % empty; ~96 % Europe/Rome;
segmento 80/12/8 % retail/private/business; ~1 % two-line and ~0.5 % ';' in indirizzo.

``write_csv`` writes what an Italian CRM or Excel exports: ';'-separated, UTF-8 with BOM,
CRLF between records, LF inside quoted multi-line fields, booleans as ``sì``/``no``,
and ``round(broken_share * n)`` structurally broken rows (wrong field count, default
0.1 %), each on a single physical line. ``write_parquet`` writes the table unchanged.
"""

from __future__ import annotations

import random
import unicodedata
from collections.abc import Sequence
from datetime import date
from pathlib import Path

import numpy as np
import numpy.typing as npt
import polars as pl

from recapito.errors import InputError
from recapito.sandbox import world

# --- embedded reference data -------------------------------------------------------

MALE_NAMES = (
    "Marco",
    "Alessandro",
    "Giuseppe",
    "Francesco",
    "Luca",
    "Andrea",
    "Giovanni",
    "Matteo",
    "Lorenzo",
    "Davide",
    "Simone",
    "Federico",
    "Riccardo",
    "Stefano",
    "Antonio",
    "Roberto",
    "Paolo",
    "Mario",
    "Luigi",
    "Salvatore",
    "Vincenzo",
    "Fabio",
    "Massimo",
    "Claudio",
    "Daniele",
    "Gabriele",
    "Emanuele",
    "Nicola",
    "Pietro",
    "Tommaso",
    "Filippo",
    "Michele",
    "Alberto",
    "Enrico",
    "Carlo",
    "Giorgio",
    "Sergio",
    "Franco",
    "Bruno",
    "Angelo",
    "Domenico",
    "Raffaele",
    "Gianluca",
    "Fabrizio",
    "Maurizio",
    "Massimiliano",
    "Cristian",
    "Diego",
    "Edoardo",
    "Leonardo",
    "Samuele",
    "Jacopo",
    "Niccolò",
    "Mattia",
    "Giacomo",
    "Alessio",
    "Valerio",
    "Ivan",
    "Umberto",
    "Renato",
    "Guido",
    "Ettore",
    "Achille",
    "Dario",
    "Elia",
    "Ludovico",
    "Gennaro",
    "Ciro",
    "Pasquale",
    "Gaetano",
    "Rocco",
    "Carmine",
    "Cosimo",
    "Donato",
    "Arturo",
    "Aldo",
    "Walter",
    "Ugo",
    "Gianmarco",
    "Gianfranco",
    "Pierluigi",
    "Luciano",
    "Sandro",
    "Silvio",
    "Ruggero",
    "Ottavio",
    "Corrado",
    "Marcello",
    "Nicolò",
    "Tiziano",
    "Manuel",
    "Giulio",
    "Ernesto",
    "Vittorio",
    "Adriano",
    "Emilio",
    "Fabiano",
    "Cesare",
    "Rosario",
    "Calogero",
    "Saverio",
    "Agostino",
    "Biagio",
    "Benedetto",
    "Gian Luca",
    "Pier Paolo",
    "Gian Maria",
)


FEMALE_NAMES = (
    "Giulia",
    "Francesca",
    "Chiara",
    "Sara",
    "Martina",
    "Valentina",
    "Alessia",
    "Federica",
    "Elisa",
    "Silvia",
    "Laura",
    "Anna",
    "Maria",
    "Giorgia",
    "Elena",
    "Paola",
    "Roberta",
    "Alice",
    "Sofia",
    "Aurora",
    "Beatrice",
    "Camilla",
    "Ginevra",
    "Noemi",
    "Arianna",
    "Ilaria",
    "Serena",
    "Monica",
    "Cristina",
    "Barbara",
    "Daniela",
    "Simona",
    "Claudia",
    "Michela",
    "Veronica",
    "Manuela",
    "Antonella",
    "Patrizia",
    "Rosa",
    "Giovanna",
    "Angela",
    "Lucia",
    "Teresa",
    "Carmela",
    "Caterina",
    "Margherita",
    "Rita",
    "Emanuela",
    "Stefania",
    "Sabrina",
    "Lorena",
    "Marta",
    "Irene",
    "Benedetta",
    "Greta",
    "Matilde",
    "Vittoria",
    "Gaia",
    "Emma",
    "Nicole",
    "Rebecca",
    "Viola",
    "Bianca",
    "Ludovica",
    "Carlotta",
    "Asia",
    "Eleonora",
    "Cecilia",
    "Lisa",
    "Erika",
    "Jessica",
    "Debora",
    "Marina",
    "Luisa",
    "Franca",
    "Gabriella",
    "Loredana",
    "Tiziana",
    "Raffaella",
    "Donatella",
    "Ornella",
    "Graziella",
    "Nadia",
    "Rosanna",
    "Concetta",
    "Assunta",
    "Immacolata",
    "Filomena",
    "Annalisa",
    "Mariangela",
    "Maddalena",
    "Agnese",
    "Letizia",
    "Adele",
    "Gemma",
    "Elisabetta",
    "Ester",
    "Nicoletta",
    "Miriam",
    "Fabiola",
    "Carla",
    "Pamela",
    "Noè",
    "Désirée",
    "Maria Grazia",
    "Anna Maria",
    "Maria Teresa",
    "Maria Luisa",
)


SURNAMES = (
    "Rossi",
    "Russo",
    "Ferrari",
    "Esposito",
    "Bianchi",
    "Romano",
    "Colombo",
    "Ricci",
    "Marino",
    "Greco",
    "Bruno",
    "Gallo",
    "Conti",
    "Mancini",
    "Costa",
    "Giordano",
    "Rizzo",
    "Lombardi",
    "Moretti",
    "Barbieri",
    "Fontana",
    "Santoro",
    "Mariani",
    "Rinaldi",
    "Caruso",
    "Ferrara",
    "Galli",
    "Martini",
    "Leone",
    "Longo",
    "Gentile",
    "Martinelli",
    "Vitale",
    "Lombardo",
    "Serra",
    "Coppola",
    "Marchetti",
    "Parisi",
    "Villa",
    "Conte",
    "Ferraro",
    "Ferri",
    "Fabbri",
    "Bianco",
    "Marini",
    "Grasso",
    "Valentini",
    "Messina",
    "Sala",
    "Gatti",
    "Pellegrini",
    "Palumbo",
    "Sanna",
    "Farina",
    "Rizzi",
    "Monti",
    "Cattaneo",
    "Morelli",
    "Amato",
    "Silvestri",
    "Mazza",
    "Testa",
    "Grassi",
    "Pellegrino",
    "Carbone",
    "Giuliani",
    "Benedetti",
    "Barone",
    "Rossetti",
    "Caputo",
    "Montanari",
    "Guerra",
    "Palmieri",
    "Bernardi",
    "Martino",
    "Fiore",
    "Ferretti",
    "Bellini",
    "Basile",
    "Riva",
    "Donati",
    "Piras",
    "Vitali",
    "Battaglia",
    "Sartori",
    "Neri",
    "Costantini",
    "Milani",
    "Pagano",
    "Ruggiero",
    "Sorrentino",
    "Orlando",
    "Negri",
    "Orsini",
    "Mele",
    "Bassi",
    "Longhi",
    "Zanetti",
    "Fumagalli",
    "Brambilla",
    "Pozzi",
    "Ferrario",
    "Galbiati",
    "Meloni",
    "Deiana",
    "Melis",
    "Pinna",
    "Mura",
    "Cocco",
    "Lai",
    "Usai",
    "Fadda",
    "Sechi",
    "Cirillo",
    "Iovine",
    "Pappalardo",
    "Zanella",
    "Zanon",
    "Zanin",
    "Bortolotti",
    "Zago",
    "Furlan",
    "Scarpa",
    "Visentin",
    "Pavan",
    "Tonon",
    "Trevisan",
    "Marchi",
    "Bonetti",
    "Tosi",
    "Rota",
    "Guidi",
    "Bertolini",
    "Bonini",
    "Canale",
    "Cantù",
    "Zappalà",
    "Pitrè",
    "Nicolò",
    "Borrè",
    "Giannini",
    "Bruni",
    "Cocchi",
    "Lucchesi",
    "Bartolini",
    "Cecchi",
    "Fiorentino",
    "Santini",
    "Mazzoni",
    "Piazza",
    "Sorrentino",
    "Marras",
    "Cossu",
    "Ruggeri",
    "Tedesco",
    "Colonna",
    "Ferrante",
    "Pace",
    "Caprioli",
    "Lupo",
    "Fusco",
    "Rinaldo",
    "Bellucci",
    "Gasparini",
    "Sabatini",
    "Morello",
    "Montalbano",
    "Pirrone",
    "Scuderi",
    "Spadaro",
    "Catalano",
    "Randazzo",
    "Calabrese",
    "Arena",
    "Marotta",
    "De Luca",
    "De Santis",
    "D'Angelo",
    "De Angelis",
    "De Rosa",
    "D'Amico",
    "Lo Bianco",
    "La Rosa",
    "Di Stefano",
    "Di Marco",
    "Di Giovanni",
    "Di Pietro",
    "D'Alessandro",
    "De Simone",
    "De Marco",
    "Dell'Orto",
    "Dall'Ara",
    "Dal Bello",
    "Da Ros",
    "Lo Presti",
    "Dell'Acqua",
    "Li Causi",
)


# (city, CAP of the first postcode, number of consecutive postcodes, provincia, weight)
CITIES: tuple[tuple[str, int, int, str, int], ...] = (
    ("Roma", 118, 82, "RM", 280),
    ("Milano", 20121, 42, "MI", 140),
    ("Napoli", 80121, 27, "NA", 95),
    ("Torino", 10121, 36, "TO", 85),
    ("Palermo", 90121, 29, "PA", 64),
    ("Genova", 16121, 46, "GE", 56),
    ("Bologna", 40121, 21, "BO", 39),
    ("Firenze", 50121, 25, "FI", 37),
    ("Bari", 70121, 12, "BA", 31),
    ("Catania", 95121, 11, "CT", 30),
    ("Venezia", 30121, 5, "VE", 25),
    ("Verona", 37121, 22, "VR", 25),
    ("Messina", 98121, 8, "ME", 22),
    ("Padova", 35121, 22, "PD", 21),
    ("Trieste", 34121, 31, "TS", 20),
    ("Brescia", 25121, 16, "BS", 19),
    ("Parma", 43121, 6, "PR", 19),
    ("Taranto", 74121, 3, "TA", 19),
    ("Prato", 59100, 1, "PO", 19),
    ("Modena", 41121, 6, "MO", 18),
    ("Reggio Calabria", 89121, 15, "RC", 17),
    ("Reggio Emilia", 42121, 4, "RE", 17),
    ("Perugia", 6121, 12, "PG", 16),
    ("Ravenna", 48121, 5, "RA", 15),
    ("Livorno", 57121, 8, "LI", 15),
    ("Cagliari", 9121, 14, "CA", 15),
    ("Foggia", 71121, 2, "FG", 15),
    ("Rimini", 47921, 3, "RN", 15),
    ("Salerno", 84121, 15, "SA", 13),
    ("Ferrara", 44121, 4, "FE", 13),
    ("Sassari", 7100, 1, "SS", 12),
    ("Latina", 4100, 1, "LT", 12),
    ("Monza", 20900, 1, "MB", 12),
    ("Siracusa", 96100, 1, "SR", 12),
    ("Pescara", 65121, 9, "PE", 12),
    ("Bergamo", 24121, 9, "BG", 12),
    ("Forlì", 47121, 2, "FC", 11),
    ("Trento", 38121, 3, "TN", 11),
    ("Vicenza", 36100, 1, "VI", 11),
    ("Terni", 5100, 1, "TR", 11),
    ("Bolzano", 39100, 1, "BZ", 10),
    ("Novara", 28100, 1, "NO", 10),
    ("Piacenza", 29121, 2, "PC", 10),
    ("Ancona", 60121, 11, "AN", 10),
    ("Andria", 76123, 1, "BT", 10),
    ("Arezzo", 52100, 1, "AR", 9),
    ("Udine", 33100, 1, "UD", 9),
    ("Cesena", 47521, 2, "FC", 9),
    ("Lecce", 73100, 1, "LE", 9),
    ("Pesaro", 61121, 2, "PU", 9),
    ("La Spezia", 19121, 6, "SP", 9),
    ("Alessandria", 15121, 2, "AL", 9),
    ("Barletta", 76121, 1, "BT", 9),
    ("Catanzaro", 88100, 1, "CZ", 8),
    ("Pistoia", 51100, 1, "PT", 8),
    ("Brindisi", 72100, 1, "BR", 8),
    ("Pisa", 56121, 8, "PI", 8),
    ("Torre del Greco", 80059, 1, "NA", 8),
    ("Como", 22100, 1, "CO", 8),
    ("Lucca", 55100, 1, "LU", 8),
    ("Guidonia Montecelio", 12, 1, "RM", 8),
    ("Pozzuoli", 80078, 1, "NA", 7),
    ("Treviso", 31100, 1, "TV", 7),
    ("Marsala", 91025, 1, "TP", 7),
    ("Grosseto", 58100, 1, "GR", 7),
    ("Busto Arsizio", 21052, 1, "VA", 7),
    ("Varese", 21100, 1, "VA", 7),
    ("Sesto San Giovanni", 20099, 1, "MI", 7),
    ("Casoria", 80026, 1, "NA", 7),
    ("Caserta", 81100, 1, "CE", 7),
    ("Gela", 93012, 1, "CL", 7),
    ("Asti", 14100, 1, "AT", 7),
    ("Cinisello Balsamo", 20092, 1, "MI", 7),
    ("Ragusa", 97100, 1, "RG", 7),
    ("L'Aquila", 67100, 1, "AQ", 7),
    ("Cremona", 26100, 1, "CR", 7),
    ("Quartu Sant'Elena", 9045, 1, "CA", 7),
    ("Lamezia Terme", 88046, 1, "CZ", 7),
    ("Pavia", 27100, 1, "PV", 7),
    ("Massa", 54100, 1, "MS", 7),
    ("Trapani", 91100, 1, "TP", 7),
    ("Aprilia", 4011, 1, "LT", 7),
    ("Cosenza", 87100, 1, "CS", 7),
    ("Altamura", 70022, 1, "BA", 7),
    ("Imola", 40026, 1, "BO", 7),
    ("Carpi", 41012, 1, "MO", 7),
    ("Potenza", 85100, 1, "PZ", 7),
    ("Carrara", 54033, 1, "MS", 6),
    ("Viterbo", 1100, 1, "VT", 6),
    ("Fiumicino", 54, 1, "RM", 6),
    ("Vigevano", 27029, 1, "PV", 6),
    ("Legnano", 20025, 1, "MI", 6),
    ("Savona", 17100, 1, "SV", 6),
    ("Matera", 75100, 1, "MT", 6),
    ("Olbia", 7026, 1, "SS", 6),
    ("Caltanissetta", 93100, 1, "CL", 6),
    ("Benevento", 82100, 1, "BN", 6),
    ("Avellino", 83100, 1, "AV", 5),
    ("Agrigento", 92100, 1, "AG", 5),
    ("Crotone", 88900, 1, "KR", 5),
    ("Campobasso", 86100, 1, "CB", 5),
    ("Isernia", 86170, 1, "IS", 2),
    ("Aosta", 11100, 1, "AO", 3),
    ("Belluno", 32100, 1, "BL", 3),
    ("Rovigo", 45100, 1, "RO", 4),
    ("Mantova", 46100, 1, "MN", 4),
    ("Lodi", 26900, 1, "LO", 4),
    ("Lecco", 23900, 1, "LC", 4),
    ("Sondrio", 23100, 1, "SO", 2),
    ("Biella", 13900, 1, "BI", 4),
    ("Vercelli", 13100, 1, "VC", 4),
    ("Cuneo", 12100, 1, "CN", 5),
    ("Verbania", 28922, 1, "VB", 3),
    ("Imperia", 18100, 1, "IM", 4),
    ("Gorizia", 34170, 1, "GO", 3),
    ("Pordenone", 33170, 1, "PN", 5),
    ("Siena", 53100, 1, "SI", 5),
    ("Macerata", 62100, 1, "MC", 4),
    ("Fermo", 63900, 1, "FM", 3),
    ("Ascoli Piceno", 63100, 1, "AP", 4),
    ("Rieti", 2100, 1, "RI", 4),
    ("Frosinone", 3100, 1, "FR", 4),
    ("Chieti", 66100, 1, "CH", 5),
    ("Teramo", 64100, 1, "TE", 5),
    ("Nuoro", 8100, 1, "NU", 3),
    ("Oristano", 9170, 1, "OR", 3),
    ("Enna", 94100, 1, "EN", 3),
    ("Vibo Valentia", 89900, 1, "VV", 3),
    ("Trani", 76125, 1, "BT", 5),
    ("Urbino", 61029, 1, "PU", 2),
    ("Cantù", 22063, 1, "CO", 4),
    ("Gallarate", 21013, 1, "VA", 5),
    ("Sanremo", 18038, 1, "IM", 5),
)

STREETS = (
    "Via Roma",
    "Via Garibaldi",
    "Corso Vittorio Emanuele II",
    "Via Mazzini",
    "Via Cavour",
    "Piazza del Duomo",
    "Via Dante Alighieri",
    "Via XX Settembre",
    "Viale della Repubblica",
    "Via Giuseppe Verdi",
    "Via Guglielmo Marconi",
    "Corso Italia",
    "Via Nazionale",
    "Via San Francesco d'Assisi",
    "Via dei Mille",
    "Via John Fitzgerald Kennedy",
    "Via Giacomo Matteotti",
    "Via Antonio Gramsci",
    "Via Giacomo Leopardi",
    "Via Alessandro Manzoni",
    "Via Giosuè Carducci",
    "Via Cristoforo Colombo",
    "Via Trieste",
    "Via Trento",
    "Via Milano",
    "Via Torino",
    "Via Napoli",
    "Piazza della Libertà",
    "Via IV Novembre",
    "Via Vittorio Veneto",
    "Largo Augusto",
    "Via Giovanni Pascoli",
    "Via Francesco Petrarca",
    "Via Giovanni Boccaccio",
    "Via Vincenzo Bellini",
    "Via Gioachino Rossini",
    "Via Giacomo Puccini",
    "Via Enrico Fermi",
    "Via Alessandro Volta",
    "Via Galileo Galilei",
    "Via Aldo Moro",
    "Via Papa Giovanni XXIII",
    "Via delle Rose",
    "Via dei Tigli",
    "Viale Europa",
    "Via Firenze",
    "Via Venezia",
    "Via Cesare Battisti",
    "Via Nino Bixio",
    "Via Don Giovanni Minzoni",
    "Strada Statale 16",
    "Località Case Sparse",
    "Vicolo del Pozzo",
    "Via dell'Università",
    "Piazza Unità d'Italia",
)

SECOND_LINES = (
    "Scala B, int. 4",
    "c/o Studio Bianchi",
    "Piano 3",
    "Presso Condominio Aurora",
    "Palazzina C",
    "Interno 12",
)

OTHER_TIME_ZONES = (
    "Europe/London",
    "Europe/Berlin",
    "Europe/Zurich",
    "Europe/Paris",
    "America/New_York",
    "America/Argentina/Buenos_Aires",
    "Australia/Sydney",
    "Asia/Tokyo",
)

MOBILE_PREFIXES = (
    "320",
    "324",
    "327",
    "328",
    "329",
    "330",
    "331",
    "333",
    "334",
    "335",
    "336",
    "338",
    "339",
    "340",
    "342",
    "345",
    "346",
    "347",
    "348",
    "349",
    "350",
    "351",
    "366",
    "368",
    "370",
    "377",
    "380",
    "388",
    "389",
    "391",
    "392",
    "393",
)
LANDLINE_PREFIXES = ("02", "06", "011", "051", "055", "081", "091", "010", "045", "070")
JUNK_PHONES = ("12345", "+39 3", "339 12", "n.d.", "0000000000", "+39 333 12345678901", "-")

# Shares that the module docstring promises.
EMPTY_SHARE = 0.003
MALFORMED_SHARE = 0.005
DUPLICATE_SHARE = 0.01
MARKER_SHARE = 0.02
MARKER_DOMAIN = "comune-esempio.test"
PEC_SHARE = 0.15

COLUMNS = (
    "id",
    "nome",
    "cognome",
    "email",
    "pec",
    "cellulare",
    "indirizzo",
    "cap",
    "citta",
    "provincia",
    "fuso_orario",
    "consenso_email",
    "consenso_sms",
    "segmento",
    "data_nascita",
)


def _slug(text: str) -> str:
    """ASCII local-part form of a name: accents dropped, spaces and apostrophes removed."""
    folded = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    return "".join(ch for ch in folded.lower() if ch.isalnum())


def _zipf_weights(count: int, flatten: float) -> npt.NDArray[np.float64]:
    """Skewed popularity: the first entries of each list are the most common."""
    ranks = np.arange(count, dtype=np.float64)
    weights: npt.NDArray[np.float64] = 1.0 / (ranks + flatten)
    return weights / float(weights.sum())


def _pick(values: Sequence[str], idx: npt.NDArray[np.int64]) -> pl.Series:
    return pl.Series(values=list(values), dtype=pl.String).gather(idx)


def _digits(rng: np.random.Generator, n: int, width: int) -> pl.Series:
    """``n`` random zero-padded decimal strings of ``width`` digits."""
    nums = rng.integers(0, 10**width, size=n)
    return pl.Series(nums).cast(pl.String).str.zfill(width)


def _unique_locals(local: pl.Series, domain: pl.Series, rng: np.random.Generator) -> pl.Series:
    """Append digits to later copies of an address until every address is unique.

    Uniqueness is case-insensitive, like the targeting dedupe key.
    """
    for _ in range(50):
        key = (local + "@" + domain).str.to_lowercase()
        dup = ~key.is_first_distinct()
        count = int(dup.sum())
        if count == 0:
            return local
        suffix = pl.Series(rng.integers(1, 10_000, size=len(local))).cast(pl.String)
        local = pl.select(pl.when(dup).then(local + suffix).otherwise(local)).to_series()
    raise RuntimeError("could not make demo addresses unique")  # practically unreachable


def generate(n: int = 10_000, seed: int = 42) -> pl.DataFrame:
    """Return ``n`` synthetic contacts, identical for identical ``(n, seed)``.

    See the module docstring for the columns and the guaranteed shares of empty,
    malformed, duplicate and rejected-by-MX addresses.
    """
    if n < 0:
        raise InputError(f"demo data: contacts must be zero or more, got {n}")
    rng = np.random.default_rng(seed)

    # Who: sex, first name, surname, birth date.
    female = rng.random(n) < 0.5
    male_idx = rng.choice(len(MALE_NAMES), size=n, p=_zipf_weights(len(MALE_NAMES), 8.0))
    female_idx = rng.choice(len(FEMALE_NAMES), size=n, p=_zipf_weights(len(FEMALE_NAMES), 8.0))
    first_idx = np.where(female, len(MALE_NAMES) + female_idx, male_idx)
    first_names = list(MALE_NAMES) + list(FEMALE_NAMES)
    last_idx = rng.choice(len(SURNAMES), size=n, p=_zipf_weights(len(SURNAMES), 5.0))
    nome = _pick(first_names, first_idx)
    cognome = _pick(SURNAMES, last_idx)
    first_slug = _pick([_slug(x) for x in first_names], first_idx)
    last_slug = _pick([_slug(x) for x in SURNAMES], last_idx)
    epoch_days_1940 = (date(1940, 1, 1) - date(1970, 1, 1)).days
    span_days = (date(2006, 12, 31) - date(1940, 1, 1)).days
    birth_days = rng.integers(0, span_days + 1, size=n) + epoch_days_1940
    data_nascita = pl.Series(birth_days.astype(np.int32)).cast(pl.Date)
    yy = (data_nascita.dt.year() % 100).cast(pl.String).str.zfill(2)

    # E-mail local part: one of the usual patterns people pick.
    pattern = rng.choice(8, size=n, p=[0.38, 0.14, 0.10, 0.08, 0.10, 0.05, 0.10, 0.05])
    number = pl.Series(rng.integers(1, 1000, size=n)).cast(pl.String)
    frame = pl.DataFrame({"f": first_slug, "l": last_slug, "yy": yy, "num": number, "pat": pattern})
    f, last, p = pl.col("f"), pl.col("l"), pl.col("pat")
    local_expr = (
        pl.when(p == 0)
        .then(f + "." + last)
        .when(p == 1)
        .then(f.str.slice(0, 1) + "." + last + pl.col("yy"))
        .when(p == 2)
        .then(f + last)
        .when(p == 3)
        .then(last + "." + f)
        .when(p == 4)
        .then(f + "." + last + pl.col("num"))
        .when(p == 5)
        .then(f + "_" + last)
        .when(p == 6)
        .then(f + pl.col("yy"))
        .otherwise(last + pl.col("num"))
    )
    local = frame.select(local_expr.alias("local")).to_series()
    # A few people typed their address with capitals; the local part keeps its case.
    capital = pl.Series(rng.random(n) < 0.03)
    local = pl.select(pl.when(capital).then(local.str.to_titlecase()).otherwise(local)).to_series()

    domains = world.email_domains()
    weights = np.array([w for _, w in domains], dtype=np.float64)
    domain_idx = rng.choice(len(domains), size=n, p=weights / weights.sum())
    domain = _pick([d for d, _ in domains], domain_idx)
    local = _unique_locals(local, domain, rng)

    email = local + "@" + domain
    email_values: list[str] = email.to_list()
    local_values: list[str] = local.to_list()
    domain_values: list[str] = domain.to_list()
    first_slugs: list[str] = first_slug.to_list()
    last_slugs: list[str] = last_slug.to_list()

    # Addresses the rejecting MX refuses: only on the domain it serves.
    marker_pool = np.flatnonzero(domain_idx == [d for d, _ in domains].index(MARKER_DOMAIN))
    marker_count = min(round(MARKER_SHARE * n), len(marker_pool))
    marker_rows = rng.choice(marker_pool, size=marker_count, replace=False)
    markers = world.REJECTED_LOCAL_MARKERS
    for k, row in enumerate(sorted(int(r) for r in marker_rows)):
        marker = markers[k % len(markers)]
        base = local_values[row]
        new_local = f"{marker}.{base}" if k % 2 == 0 else f"{base}.{marker}"
        email_values[row] = f"{new_local}@{domain_values[row]}"

    # The other defects come from the remaining rows, in a random but disjoint order.
    marked = np.zeros(n, dtype=bool)
    marked[marker_rows] = True
    order = rng.permutation(np.flatnonzero(~marked))
    empty_count = round(EMPTY_SHARE * n)
    malformed_count = round(MALFORMED_SHARE * n)
    dup_count = round(DUPLICATE_SHARE * n)
    if empty_count + malformed_count + 2 * dup_count > len(order):
        raise InputError(f"demo data: {n} contacts are too few for the guaranteed shares")
    cursor = 0
    for row in order[cursor : cursor + empty_count]:
        email_values[int(row)] = ""
    cursor += empty_count
    for k, row in enumerate(order[cursor : cursor + malformed_count]):
        r = int(row)
        if k % 3 == 0:  # missing "@"
            email_values[r] = f"{local_values[r]}{domain_values[r]}"
        elif k % 3 == 1:  # a space inside
            email_values[r] = f"{first_slugs[r]} {last_slugs[r]}@{domain_values[r]}"
        else:  # two dots in a row
            email_values[r] = f"{first_slugs[r]}..{last_slugs[r]}@{domain_values[r]}"
    cursor += malformed_count
    pairs = order[cursor : cursor + 2 * dup_count].reshape(-1, 2)
    for k, (a, b) in enumerate(pairs):
        src, dst = int(min(a, b)), int(max(a, b))
        address = email_values[src]
        at = address.rindex("@")
        variant = k % 4
        if variant == 0:
            email_values[dst] = address.upper()
        elif variant == 1:
            email_values[dst] = address[:at].title() + address[at:].upper()
        elif variant == 2:
            email_values[dst] = f"  {address}"
        else:
            email_values[dst] = f"{address[:at].capitalize()}{address[at:]} "

    # PEC mailbox for about 15 %.
    has_pec = rng.random(n) < PEC_SHARE
    pec_domains = world.pec_domains()
    pec_domain = _pick(pec_domains, rng.integers(0, len(pec_domains), size=n))
    pec_local = _unique_locals(first_slug + "." + last_slug, pec_domain, rng)
    pec = pl.select(
        pl.when(pl.Series(has_pec)).then(pec_local + "@" + pec_domain).otherwise(None)
    ).to_series()

    # Phone numbers as people and call centres type them.
    kind = rng.choice(4, size=n, p=[0.85, 0.05, 0.03, 0.07])
    fmt = rng.choice(4, size=n, p=[0.5, 0.2, 0.2, 0.1])
    prefix = _pick(MOBILE_PREFIXES, rng.integers(0, len(MOBILE_PREFIXES), size=n))
    subscriber = _digits(rng, n, 7)
    landline = (
        _pick(LANDLINE_PREFIXES, rng.integers(0, len(LANDLINE_PREFIXES), size=n))
        + " "
        + _digits(rng, n, 7)
    )
    junk = _pick(JUNK_PHONES, rng.integers(0, len(JUNK_PHONES), size=n))
    phones = pl.DataFrame(
        {
            "kind": kind,
            "fmt": fmt,
            "p": prefix,
            "s": subscriber,
            "land": landline,
            "junk": junk,
        }
    )
    mobile_expr = (
        pl.when(pl.col("fmt") == 0)
        .then("+39 " + pl.col("p") + " " + pl.col("s"))
        .when(pl.col("fmt") == 1)
        .then("+39" + pl.col("p") + pl.col("s"))
        .when(pl.col("fmt") == 2)
        .then(pl.col("p") + " " + pl.col("s"))
        .otherwise("0039 " + pl.col("p") + "-" + pl.col("s"))
    )
    cellulare = phones.select(
        pl.when(pl.col("kind") == 0)
        .then(mobile_expr)
        .when(pl.col("kind") == 1)
        .then(pl.col("land"))
        .when(pl.col("kind") == 2)
        .then(pl.col("junk"))
        .otherwise(None)
        .alias("cellulare")
    ).to_series()

    # Where: city (with its CAP and provincia) and street address.
    city_weights = np.array([c[4] for c in CITIES], dtype=np.float64)
    city_idx = rng.choice(len(CITIES), size=n, p=city_weights / city_weights.sum())
    cap_base = np.array([c[1] for c in CITIES])[city_idx]
    cap_span = np.array([c[2] for c in CITIES])[city_idx]
    cap_num = cap_base + (rng.random(n) * cap_span).astype(np.int64)
    cap = pl.Series(cap_num).cast(pl.String).str.zfill(5)
    citta = _pick([c[0] for c in CITIES], city_idx)
    provincia = _pick([c[3] for c in CITIES], city_idx)
    street = _pick(STREETS, rng.integers(0, len(STREETS), size=n))
    civic = pl.Series(rng.integers(1, 250, size=n)).cast(pl.String)
    letter = pl.Series(rng.random(n) < 0.03)
    base_address = street + " " + civic
    base_address = pl.select(
        pl.when(letter).then(base_address + "/A").otherwise(base_address)
    ).to_series()
    extra = rng.random(n)
    second = _pick(SECOND_LINES, rng.integers(0, len(SECOND_LINES), size=n))
    interno = pl.Series(rng.integers(1, 40, size=n)).cast(pl.String)
    indirizzo = pl.select(
        pl.when(pl.Series(extra < 0.01))
        .then(base_address + "\n" + second)
        .when(pl.Series(extra < 0.015))
        .then(base_address + "; int. " + interno)
        .otherwise(base_address)
    ).to_series()

    tz_other = rng.random(n) < 0.04
    tz = pl.select(
        pl.when(pl.Series(tz_other))
        .then(_pick(OTHER_TIME_ZONES, rng.integers(0, len(OTHER_TIME_ZONES), size=n)))
        .otherwise(pl.lit("Europe/Rome"))
    ).to_series()
    segment_names = ("retail", "private", "business")
    segmento = _pick(segment_names, rng.choice(3, size=n, p=[0.80, 0.12, 0.08]))

    width = max(7, len(str(n)))
    ids = pl.int_range(1, n + 1, eager=True).cast(pl.String).str.zfill(width)

    return pl.DataFrame(
        {
            "id": "C" + ids,
            "nome": nome,
            "cognome": cognome,
            "email": pl.Series(email_values, dtype=pl.String),
            "pec": pec,
            "cellulare": cellulare,
            "indirizzo": indirizzo,
            "cap": cap,
            "citta": citta,
            "provincia": provincia,
            "fuso_orario": tz,
            "consenso_email": pl.Series(rng.random(n) < 0.92),
            "consenso_sms": pl.Series(rng.random(n) < 0.75),
            "segmento": segmento,
            "data_nascita": data_nascita,
        },
        schema={c: (pl.Boolean if c.startswith("consenso") else pl.String) for c in COLUMNS}
        | {"data_nascita": pl.Date},
    )


def write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    """Write the contacts as Parquet (types kept); returns the path written."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(target)
    return target


def write_csv(
    frame: pl.DataFrame,
    path: str | Path,
    *,
    broken_share: float = 0.001,
    seed: int = 42,
) -> list[str]:
    """Write the contacts as an Italian CRM export and return the ids of the broken rows.

    ';'-separated, UTF-8 with BOM, CRLF record terminator, quotes only where needed
    (fields holding ';', '"' or a line break), booleans as ``sì``/``no``, dates ISO.
    ``round(broken_share * rows)`` single-line rows, chosen with ``seed``, are damaged
    so their field count is wrong: a field dropped, an unquoted ';' added, or the row
    cut short. A loader must reject exactly those rows and keep the rest.
    """
    if not 0.0 <= broken_share <= 1.0:
        raise InputError(f"demo data: broken_share must be within 0..1, got {broken_share}")
    text_frame = frame.with_columns(
        [
            pl.when(pl.col(c)).then(pl.lit("sì")).otherwise(pl.lit("no")).alias(c)
            for c, dtype in frame.schema.items()
            if dtype == pl.Boolean
        ]
    )
    body = text_frame.write_csv(
        None, separator=";", line_terminator="\r\n", quote_style="necessary"
    )
    # With CRLF between records and bare LF inside fields, splitting on CRLF gives
    # exactly one piece per record: the header, the rows, and a trailing "".
    records = body.split("\r\n")
    broken_ids: list[str] = []
    count = round(broken_share * frame.height)
    if count and "id" in frame.columns:
        simple = [
            i
            for i, rec in enumerate(records[1 : frame.height + 1])
            if '"' not in rec and "\n" not in rec
        ]
        picker = random.Random(seed)
        chosen = sorted(picker.sample(simple, min(count, len(simple))))
        for k, row in enumerate(chosen):
            fields = records[row + 1].split(";")
            variant = k % 3
            if variant == 0:  # a field dropped
                damaged = fields[:-1]
            elif variant == 1:  # an unquoted ';' inside the address
                pos = frame.columns.index("indirizzo") if "indirizzo" in frame.columns else 1
                damaged = [*fields[: pos + 1], "Scala A", *fields[pos + 1 :]]
            else:  # the export was cut short
                damaged = fields[: max(1, len(fields) // 2)]
            records[row + 1] = ";".join(damaged)
            broken_ids.append(fields[0])
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(records).encode("utf-8"))
    return broken_ids

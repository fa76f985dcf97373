"""Generate the sample documents used by the examples and the unit tests.

The outputs are committed, so this script exists to make them reproducible and
reviewable rather than to be run on every checkout. Every byte is derived from
fixed seeds and a fixed creation date: re-running the script must not produce a
diff, otherwise content digests (and therefore task digests) in the examples
would drift for no reason.

Outputs:

* ``examples/samples/handbook.pdf`` -- 37 pages of readable English prose on
  nine unrelated topics, laid out in contiguous blocks of pages so that
  chunking and RAPTOR clustering have real structure to find.
* ``examples/samples/inventory.csv`` -- 7,000 data rows, i.e. three row tasks
  of at most 3,000 rows each.
* ``examples/samples/guide.md`` -- a short Markdown document (one task).
* ``tests/data/encrypted.pdf`` -- a user-password protected PDF. This is the
  one output that differs between runs: pypdf draws the file identifier that
  seeds the encryption key from ``secrets``. Only its "is encrypted" property
  matters to the tests.
* ``tests/data/truncated.pdf`` -- the handbook cut off mid-file.

Requires ``fpdf2`` (a sample-generation dependency only) and ``pypdf``.
"""

# The sentence banks below are prose, one sentence per line; wrapping them to
# the line limit would only make them harder to read and edit.
# ruff: noqa: E501

from __future__ import annotations

import csv
import datetime as dt
import io
import random
from pathlib import Path

from fpdf import FPDF
from pypdf import PdfReader, PdfWriter

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "examples" / "samples"
TEST_DATA = ROOT / "tests" / "data"

PDF_PAGES = 37
CSV_ROWS = 7_000
SEED = 20240601
# A fixed date keeps the PDF /CreationDate and the derived /ID stable.
CREATED = dt.datetime(2024, 6, 1, 12, 0, 0, tzinfo=dt.UTC)

# Each topic is a bank of self-contained sentences. Pages draw paragraphs from
# one topic at a time so that neighbouring pages are about the same subject,
# which is what makes the clusters in the RAPTOR example meaningful.
TOPICS: dict[str, list[str]] = {
    "Beekeeping": [
        "A healthy honey bee colony in midsummer can contain more than fifty thousand workers.",
        "The queen is the only fertile female in the hive and may lay two thousand eggs on a good day.",
        "Worker bees change jobs as they age, moving from cleaning cells to nursing larvae and finally to foraging.",
        "Beekeepers inspect the brood frames every week in spring to look for queen cells and signs of swarming.",
        "A swarm is the colony's way of reproducing, and it usually leaves with the old queen on a warm afternoon.",
        "Varroa mites feed on developing bees and spread viruses, so most apiaries treat for them in late summer.",
        "Smoke calms the bees because it masks the alarm pheromone released by the guards at the entrance.",
        "Honey is ripened nectar that the bees have fanned until its water content falls below about eighteen percent.",
        "A strong colony needs roughly twenty kilograms of stored honey to survive a northern winter.",
        "In cold weather the bees form a tight cluster and shiver their flight muscles to keep the queen warm.",
        "Drones are raised in spring and are driven out of the hive when the nectar flow ends in autumn.",
        "Wax is secreted by glands on the underside of young workers and shaped into hexagonal cells.",
        "Placing hives near clover, lime trees or heather changes the colour and the flavour of the honey.",
        "Good ventilation in the hive prevents condensation, which is more dangerous to bees than the cold itself.",
        "The waggle dance tells other foragers the direction and distance of a rich patch of flowers.",
        "Propolis, a sticky resin collected from tree buds, is used by the bees to seal cracks in the hive.",
    ],
    "Sourdough baking": [
        "A sourdough starter is a living culture of wild yeast and lactic acid bacteria kept in flour and water.",
        "Feeding the starter twice a day at room temperature makes it rise predictably and smell pleasantly sour.",
        "Most bakers mix the dough at about seventy percent hydration, which is easy to handle by hand.",
        "An autolyse, a rest of flour and water before the salt goes in, lets the gluten start forming on its own.",
        "Stretching and folding the dough every half hour builds strength without a long session of kneading.",
        "Bulk fermentation is finished when the dough has grown by about half and shows bubbles at the edges.",
        "Shaping creates surface tension, and a tight skin helps the loaf hold its form in the oven.",
        "A long cold proof in the refrigerator deepens the flavour and makes the loaf easier to score.",
        "Scoring the top with a razor blade controls where the loaf opens and creates the raised ear.",
        "Baking inside a preheated cast iron pot traps steam during the first twenty minutes.",
        "Steam keeps the crust soft long enough for the loaf to expand fully before it sets.",
        "The crust darkens through the Maillard reaction once the lid comes off and the surface dries.",
        "A loaf should cool for at least an hour because the crumb is still setting as the steam escapes.",
        "Whole wheat flour absorbs more water than white flour, so the recipe needs extra hydration.",
        "A dense, gummy crumb usually means the dough was underproofed or the starter was weak.",
        "Rye flour ferments quickly and gives the bread a darker colour and a tangier taste.",
    ],
    "Ocean tides": [
        "Tides are the regular rise and fall of sea level caused mainly by the gravitational pull of the Moon.",
        "Most coasts see two high tides and two low tides in a little more than a day.",
        "The Sun also raises tides, but its effect is a little less than half that of the Moon.",
        "Spring tides happen near new and full moon, when the Sun and the Moon pull in the same line.",
        "Neap tides occur at the quarter moons and have the smallest difference between high and low water.",
        "The Bay of Fundy in Canada has some of the largest tidal ranges in the world, above fifteen metres.",
        "Enclosed seas such as the Mediterranean have very small tides because the basin cannot resonate strongly.",
        "Tide tables are computed from harmonic constituents measured at each port over many years.",
        "Strong tidal currents race through narrow straits and can be dangerous for small boats.",
        "Coastal mudflats exposed at low tide feed enormous numbers of wading birds during migration.",
        "Tidal power stations use barrages or underwater turbines to turn moving water into electricity.",
        "Friction from the tides slowly lengthens the day and pushes the Moon a few centimetres farther away each year.",
        "Storm surges add to the astronomical tide and cause the worst flooding when they arrive at high water.",
        "Sailors time their departures with the ebb so that the current carries them out of the harbour.",
        "Rock pools left behind by the falling tide shelter anemones, crabs and small fish.",
        "A tidal bore is a wave that travels up a river when the incoming tide meets a narrowing estuary.",
    ],
    "Railway history": [
        "The first public railway to use steam locomotives opened between Stockton and Darlington in 1825.",
        "Early engineers argued for years about the best track gauge before standard gauge won in most countries.",
        "The Liverpool and Manchester Railway proved that passengers, not only coal, could make a line profitable.",
        "Railways forced towns to agree on a single standard time so that timetables made sense.",
        "Building the great viaducts required thousands of workers, known as navvies, who lived in camps along the route.",
        "The transcontinental railroad in the United States was completed in 1869 with a golden spike in Utah.",
        "Signal boxes used mechanical levers and long wires to move points and signals safely.",
        "The telegraph grew alongside the railway and was used to tell stations that a train had left.",
        "Dining cars and sleeping cars turned long journeys into something closer to a hotel stay.",
        "Electric traction arrived first on underground lines, where smoke from steam engines was unbearable.",
        "Diesel locomotives replaced steam in most countries during the nineteen fifties and sixties.",
        "High speed lines in Japan began in 1964, when the first bullet trains connected Tokyo and Osaka.",
        "Freight railways still move enormous tonnages of grain, ore and containers across continents.",
        "Many closed branch lines have been reborn as heritage railways run by volunteers.",
        "Rail transport produces far less carbon dioxide per passenger than flying the same distance.",
        "Modern signalling systems track each train by radio and keep safe gaps between them automatically.",
    ],
    "Volcanoes": [
        "A volcano forms where molten rock from deep inside the Earth reaches the surface.",
        "Most volcanoes lie along the boundaries of tectonic plates, especially around the Pacific Ocean.",
        "Shield volcanoes such as those in Hawaii have gentle slopes built from runny basalt lava.",
        "Stratovolcanoes are steep cones made of alternating layers of lava, ash and broken rock.",
        "The amount of dissolved gas and silica in the magma decides whether an eruption is gentle or explosive.",
        "Pyroclastic flows are avalanches of hot gas and ash that can travel faster than a car.",
        "The eruption of Vesuvius in the year 79 buried the Roman towns of Pompeii and Herculaneum.",
        "Volcanic ash is made of tiny shards of glass and rock that damage aircraft engines.",
        "Large eruptions can cool the global climate for a year or two by injecting sulphur into the stratosphere.",
        "Geologists watch for swarms of small earthquakes and swelling of the ground before an eruption.",
        "Soils formed from weathered volcanic rock are often very fertile and support dense farming.",
        "Geothermal power plants tap the heat stored in rocks near active volcanic areas.",
        "Iceland sits on a mid-ocean ridge and has frequent fissure eruptions that pour out lava for weeks.",
        "A caldera is a large basin that forms when the ground collapses into an emptied magma chamber.",
        "Lava tubes are tunnels left behind when the surface of a lava flow cools and the inside drains away.",
        "Undersea volcanoes build new islands, and some of them disappear again within a few years.",
    ],
    "Relational databases": [
        "A relational database stores data in tables made of rows and columns with declared types.",
        "Primary keys identify each row uniquely, and foreign keys describe the links between tables.",
        "SQL lets the user describe what data is wanted and leaves the planner to decide how to fetch it.",
        "Indexes speed up lookups at the price of extra storage and slower writes.",
        "A transaction groups several changes so that they either all happen or none of them do.",
        "Write ahead logging records every change before it reaches the data files, which makes crash recovery possible.",
        "Isolation levels control which concurrent changes a transaction is allowed to see.",
        "Row level locks let many writers work on the same table as long as they touch different rows.",
        "The query planner estimates costs from table statistics and picks the cheapest join order.",
        "Normalisation removes duplicated facts, while careful denormalisation can make reports faster.",
        "Vacuuming reclaims space left behind by updated and deleted rows in multi version systems.",
        "Replication streams the log to standby servers that can take over if the primary fails.",
        "Connection pools keep a small number of server connections open and share them among many clients.",
        "Skipping locked rows allows several workers to take jobs from the same queue table without blocking.",
        "Backups are only useful if someone regularly practises restoring them to a fresh server.",
        "Explaining a slow query shows whether it used an index or scanned the whole table.",
    ],
    "Night sky observing": [
        "On a clear moonless night far from city lights the naked eye can see a few thousand stars.",
        "Dark adaptation takes around twenty minutes, and a single glance at a phone screen undoes it.",
        "A red torch preserves night vision while reading a star chart at the telescope.",
        "Binoculars are an excellent first instrument because they show a wide field and are easy to aim.",
        "The Andromeda galaxy is the most distant object most people can see without optical aid.",
        "Planets do not twinkle as much as stars because they show a tiny disc rather than a single point.",
        "Jupiter's four largest moons change position from night to night and can be seen in binoculars.",
        "Saturn's rings are visible in a small telescope at a magnification of about thirty times.",
        "Meteor showers happen when the Earth passes through dust left behind by a comet.",
        "The Perseids in August are popular because they are rich and arrive on warm summer nights.",
        "Light pollution from badly aimed street lamps has hidden the Milky Way from most city dwellers.",
        "Astronomers measure brightness in magnitudes, where smaller numbers mean brighter objects.",
        "A steady atmosphere, known as good seeing, matters more than aperture for viewing planetary detail.",
        "The International Space Station looks like a bright, steady light crossing the sky in a few minutes.",
        "Averted vision, looking slightly to one side, helps to reveal faint nebulae and galaxies.",
        "Keeping an observing log with the date, the sky conditions and sketches builds skill over time.",
    ],
    "Urban gardening": [
        "Balconies and rooftops can produce a surprising amount of food when containers are chosen well.",
        "Most vegetables need at least six hours of direct sunlight a day to crop properly.",
        "Containers dry out quickly in summer, so a layer of mulch and regular watering are essential.",
        "Tomatoes, beans and salad leaves are reliable choices for a first season on a small terrace.",
        "Herbs such as thyme and rosemary prefer poor, well drained soil and tolerate wind.",
        "Compost made from kitchen scraps returns nutrients to the soil and reduces household waste.",
        "A worm bin works well in a flat because it is compact and does not smell when managed properly.",
        "Vertical planters and trellises make use of wall space where the floor area is limited.",
        "Community gardens give neighbours without outdoor space a plot of their own to cultivate.",
        "Flowering plants among the vegetables attract bees and hoverflies that help with pollination.",
        "Slugs and aphids are the most common pests, and handpicking is often enough on a small scale.",
        "Rain barrels collect water from downpipes and reduce the need for treated tap water.",
        "Sowing a few seeds every two weeks gives a steady harvest instead of a single glut.",
        "Heavy pots on a balcony must be placed with care because wet soil weighs a great deal.",
        "Winter crops such as kale and spinach keep the containers productive in the cold months.",
        "Saving seeds from open pollinated varieties lets a gardener adapt plants to local conditions.",
    ],
    "Cycling maintenance": [
        "A well maintained bicycle is safer, faster and more pleasant to ride than a neglected one.",
        "Checking tyre pressure every week prevents pinch flats and makes the bike roll more easily.",
        "A clean, lightly oiled chain shifts smoothly and lasts far longer than a dirty one.",
        "Chains stretch with wear, and a cheap gauge shows when the chain should be replaced.",
        "Replacing a worn chain in time protects the much more expensive cassette and chainrings.",
        "Brake pads wear faster in wet weather because grit on the rim acts like sandpaper.",
        "Disc brakes keep their stopping power in the rain but need careful alignment of the calipers.",
        "Indexing the rear derailleur with the barrel adjuster fixes most noisy or hesitant shifting.",
        "A torque wrench prevents damage to carbon parts that crack if bolts are overtightened.",
        "Patching an inner tube at the roadside takes a few minutes with levers, a patch and a pump.",
        "Tubeless tyres seal small punctures automatically with liquid sealant inside the tyre.",
        "Headset play can be felt by holding the front brake and rocking the bike back and forth.",
        "Wheels stay true longer when the spokes are evenly tensioned and checked after the first rides.",
        "Washing the bike with a gentle stream of water avoids forcing grit into the bearings.",
        "Cables and housings should be replaced when shifting becomes stiff despite good adjustment.",
        "A small saddle bag with a tube, a multitool and a pump saves many long walks home.",
    ],
}


def _topic_schedule() -> list[str]:
    """Assign topics to pages in contiguous blocks covering all 37 pages."""
    names = list(TOPICS)
    base, extra = divmod(PDF_PAGES, len(names))
    schedule: list[str] = []
    for i, name in enumerate(names):
        schedule.extend([name] * (base + (1 if i < extra else 0)))
    return schedule


def _page_paragraphs(rng: random.Random, topic: str) -> list[str]:
    """Compose two or three paragraphs of three to five sentences each."""
    bank = TOPICS[topic]
    paragraphs = []
    for _ in range(rng.choice((2, 3, 3))):
        sentences = rng.sample(bank, rng.randint(3, 5))
        paragraphs.append(" ".join(sentences))
    return paragraphs


def make_pdf(path: Path) -> bytes:
    rng = random.Random(SEED)
    pdf = FPDF(format="A4")
    pdf.set_creation_date(CREATED)
    pdf.set_title("A Handbook of Unrelated Hobbies")
    pdf.set_author("jobq sample generator")
    pdf.set_auto_page_break(auto=False)
    part: dict[str, int] = {}
    for page_no, topic in enumerate(_topic_schedule(), start=1):
        part[topic] = part.get(topic, 0) + 1
        pdf.add_page()
        pdf.set_font("Helvetica", style="B", size=16)
        pdf.multi_cell(0, 9, f"{topic}, part {part[topic]}")
        pdf.ln(4)
        pdf.set_font("Helvetica", size=11)
        for paragraph in _page_paragraphs(rng, topic):
            pdf.multi_cell(0, 6, paragraph)
            pdf.ln(5)
        pdf.set_y(-20)
        pdf.set_font("Helvetica", style="I", size=9)
        pdf.cell(0, 6, f"Page {page_no} of {PDF_PAGES}", align="C")
    data = bytes(pdf.output())
    path.write_bytes(data)
    return data


def make_csv(path: Path) -> None:
    rng = random.Random(SEED + 1)
    cities = ["Lisbon", "Oslo", "Kyoto", "Lima", "Accra", "Perth", "Quebec", "Tartu", "Cusco", "Izmir"]
    products = ["kettle", "lamp", "teapot", "bicycle pump", "notebook", "trowel", "blanket", "radio"]
    start = dt.date(2023, 1, 1)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["sku", "city", "product", "quantity", "unit_price", "restocked"])
    for i in range(CSV_ROWS):
        writer.writerow(
            [
                f"SKU-{i:05d}",
                rng.choice(cities),
                rng.choice(products),
                rng.randint(0, 500),
                f"{rng.uniform(2, 120):.2f}",
                (start + dt.timedelta(days=rng.randint(0, 364))).isoformat(),
            ]
        )
    path.write_text(buf.getvalue(), encoding="utf-8")


GUIDE_MD = """\
# Running the jobq samples

This guide walks through the sample documents that ship with jobq and what
each of them exercises in the ingestion pipeline.

## The handbook PDF

The handbook has thirty-seven pages on nine unrelated hobbies, from beekeeping
to bicycle maintenance. With the general parser it is split into windows of
twelve pages, so the last task covers only the final page.

Because neighbouring pages share a topic, the RAPTOR worker finds clusters that
line up with the chapters, and the summaries read like chapter abstracts.

## The inventory CSV

The inventory table has seven thousand rows. Tables are split into windows of
three thousand rows, which gives three tasks of 3,000, 3,000 and 1,000 rows.

Each row is rendered as `column: value` pairs before chunking, so a chunk
stays meaningful even when it is retrieved on its own.

## This guide

Markdown and plain text are always a single task. Paragraph boundaries are
kept by the chunker, and a paragraph is only split when it alone is larger
than the token budget of a chunk.

## Troubleshooting

If a document is rejected at enqueue time, the error names the reason: an
empty file, an encrypted PDF, a corrupt file or an unsupported format. Fix the
file and enqueue it again; nothing was written to the queue.
"""


def make_bad_pdfs(pdf_bytes: bytes) -> None:
    TEST_DATA.mkdir(parents=True, exist_ok=True)
    reader = PdfReader(io.BytesIO(pdf_bytes))
    writer = PdfWriter()
    for page in list(reader.pages)[:2]:
        writer.add_page(page)
    # RC4 needs no optional crypto library, so the file can be produced (and
    # recognised as encrypted) in any environment that has pypdf.
    writer.encrypt(user_password="open sesame", owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    (TEST_DATA / "encrypted.pdf").write_bytes(out.getvalue())
    (TEST_DATA / "truncated.pdf").write_bytes(pdf_bytes[: len(pdf_bytes) // 3])


def main() -> None:
    SAMPLES.mkdir(parents=True, exist_ok=True)
    pdf_bytes = make_pdf(SAMPLES / "handbook.pdf")
    make_csv(SAMPLES / "inventory.csv")
    (SAMPLES / "guide.md").write_text(GUIDE_MD, encoding="utf-8")
    make_bad_pdfs(pdf_bytes)
    for path in sorted([*SAMPLES.iterdir(), *TEST_DATA.iterdir()]):
        print(f"{path.relative_to(ROOT)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()

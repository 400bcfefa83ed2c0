"""English passages of about 50-70 word-piece tokens each, written for the attribution benchmarks."""

SAMPLE_TEXTS = [
    "The river that runs through the old town was once used to carry timber from the northern forests to the "
    "sawmills on the coast, and many of the warehouses along its banks have since been turned into apartments, "
    "galleries and small restaurants that serve fish caught the same morning by local fishermen.",
    "When the committee finally published its report, it recommended that the city invest in a network of "
    "protected bicycle lanes, extend the tram line to the university campus, and lower the speed limit on "
    "residential streets to thirty kilometres per hour, starting next spring and continuing for five years.",
    "Photosynthesis converts light energy into chemical energy stored in sugars; in the chloroplasts of plant "
    "cells, chlorophyll absorbs mostly blue and red light, which is why leaves appear green to the human eye "
    "under ordinary daylight conditions, even on cloudy afternoons in late autumn.",
    "The museum's new exhibition brings together more than two hundred objects from the bronze age, including "
    "tools, jewellery and ceremonial weapons, many of which were discovered by farmers ploughing their fields "
    "during the nineteenth century in the valleys south of the capital and along the river.",
    "Before the invention of the marine chronometer, sailors had great difficulty determining their longitude "
    "at sea, and countless ships were wrecked because navigators misjudged how far east or west they had "
    "travelled since leaving port, especially during long winter storms in the north.",
    "A good loaf of sourdough bread needs only flour, water and salt, but the baker must feed the starter "
    "regularly, control the temperature of the dough, and give it many hours to ferment so that the flavour "
    "and the crust develop properly before it goes into a very hot oven.",
    "The championship match was delayed by almost two hours because of heavy rain, yet most of the spectators "
    "stayed in their seats, singing and waving flags, until the players finally returned to the field late in "
    "the evening to finish the game under bright floodlights.",
    "Modern wind turbines can generate several megawatts of electricity each, and offshore wind farms benefit "
    "from stronger and steadier winds than those on land, although building foundations in deep water remains "
    "expensive and technically demanding for the engineers involved in designing them.",
    "The library lends not only books but also musical instruments, sewing machines and gardening tools, and "
    "its volunteers run weekly workshops where residents learn how to repair bicycles, mend clothes and fix "
    "broken household appliances instead of throwing them away at the first sign of trouble.",
    "Honeybees communicate the direction and distance of food sources through a waggle dance performed on the "
    "vertical surface of the comb, with the angle of the dance relative to gravity indicating the direction "
    "of the flowers relative to the position of the sun in the sky at that moment.",
    "After three years of negotiations, the two neighbouring countries signed an agreement to share the water "
    "of the lake fairly, to monitor pollution from factories on both shores, and to protect the wetlands where "
    "migrating birds rest every autumn and spring on their long journeys.",
    "The first transatlantic telegraph cable, completed in 1858, allowed messages to cross the ocean in minutes "
    "rather than weeks, but it failed after only a few weeks of service because the operators applied far too "
    "much voltage in an attempt to speed up transmission of the signals.",
    "Volcanic soils are often extremely fertile, which is why farmers continue to grow coffee, grapes and "
    "vegetables on the slopes of active volcanoes despite the obvious danger of eruptions, ash falls and "
    "sudden mudflows that can bury entire villages within hours of a heavy storm.",
    "The orchestra rehearsed the symphony for six weeks before the premiere, and the conductor insisted that "
    "the string section practise the difficult final movement slowly, bar by bar, until every musician could "
    "play the rapid passages cleanly and perfectly in tune with the others.",
    "Glaciers form where more snow falls in winter than melts in summer, and over centuries the accumulated "
    "snow is compressed into dense ice that slowly flows downhill under its own weight, carving deep valleys "
    "and carrying boulders far from where they originated many thousands of years earlier.",
    "The small bakery on the corner opens at six every morning, and by seven there is usually a queue of "
    "commuters, students and construction workers waiting outside for warm croissants, cinnamon rolls and "
    "strong coffee served in paper cups to take away on the train into the city.",
]

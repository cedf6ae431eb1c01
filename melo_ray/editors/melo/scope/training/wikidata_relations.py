"""Relation templates written by hand from Wikidata property labels: the scope test's own training and
validation vocabulary, owed to no editing benchmark.

Each property has wordings (cloze and question forms, `{}` for the subject) built from its label plus
some written for it, a family (properties whose questions a reader could take for one another share
one, and a split keeps a family together), an inverse (the same link asked from the other end:
"X follows" / "X is followed by"), and a pattern that finds the family in another data set's
template ("In what city did {} die?" -> place of death), so a split by relation holds across sets.
"""
from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Property:
    pid: str
    label: str
    subject: str  # what the subject is: person, place, work, org, thing
    answer: str  # who, where, when, what (how its question opens)
    family: str
    extras: tuple[str, ...] = ()
    inverse: str | None = None
    pattern: str | None = None  # regex over a lower-cased template naming this family

    def wordings(self) -> tuple[str, ...]:
        """Cloze and question forms of the label, then the written ones."""
        label, wh = self.label, ("Who" if self.answer == "who" else "What")
        if _VERB_LABEL.search(label):  # "The followed by of X is" reads as no question at all
            return tuple(dict.fromkeys(self.extras))
        generic = (f"The {label} of {{}} is", f"{{}}'s {label} is", f"{wh} is the {label} of {{}}?",
                   f"{wh} is {{}}'s {label}?")
        if self.answer in ("who", "what", "where") and not label.startswith(("date", "number", "year")):
            generic += (f"The name of the {label} of {{}} is",)
        return tuple(dict.fromkeys(generic + self.extras))


_VERB_LABEL = re.compile(r"(?: by| of| with| at| in| on|^follows|^replaces|^has part|^use)$")


def _p(pid: str, label: str, subject: str, answer: str, *extras: str, family: str | None = None,
       inverse: str | None = None, pattern: str | None = None) -> Property:
    return Property(pid, label, subject, answer, family or pid, tuple(extras), inverse, pattern)


# families of properties a question can be taken for one another ("located in" / "country"): never
# made into negatives of each other, and kept on one side of a split
PROPERTIES: tuple[Property, ...] = (
    # people: life
    _p("P19", "place of birth", "person", "where", "Where was {} born?", "{} was born in", "In which city was {} born?",
       "What is the birthplace of {}?", "{}'s birthplace is", pattern=r"\bborn\b|birth ?place|place of birth|city of birth"),
    _p("P20", "place of death", "person", "where", "Where did {} die?", "{} died in", "In which city did {} die?",
       "{} passed away in", pattern=r"\bdied\b|\bdie\b|place of death|passed away in"),
    _p("P569", "date of birth", "person", "when", "When was {} born?", "{} was born on", "In what year was {} born?",
       pattern=r"date of birth|birth ?date|year .*born|when was .*born"),
    _p("P570", "date of death", "person", "when", "When did {} die?", "{} died on", "In what year did {} die?",
       pattern=r"date of death|when did .*die|year .*die"),
    _p("P509", "cause of death", "person", "what", "How did {} die?", "What killed {}?", "{} died of",
       pattern=r"cause of death|died of|killed"),
    _p("P119", "place of burial", "person", "where", "Where is {} buried?", "{} is buried in", "{} was laid to rest in",
       pattern=r"buried|burial|laid to rest"),
    _p("P21", "gender", "person", "what", "What is the sex of {}?", "{} is of the gender", "Is {} male or female?",
       pattern=r"gender|\bsex\b"),
    _p("P91", "sexual orientation", "person", "what", "What is {}'s sexuality?", pattern=r"sexual orientation|sexuality"),
    _p("P1340", "eye color", "person", "what", "What color are {}'s eyes?", "{} has eyes of the color", pattern=r"eye colou?r"),
    _p("P2048", "height", "person", "what", "How tall is {}?", "{} stands at a height of", pattern=r"\bheight\b|how tall"),
    _p("P1971", "number of children", "person", "what", "How many children does {} have?", "{} has this many children:",
       pattern=r"number of children|how many children"),
    # people: family (father/mother/child are one family: a split keeps inverse pairs together)
    _p("P22", "father", "person", "who", "Who was the father of {}?", "{}'s dad is", "{} is the son of",
       family="parent", inverse="P40", pattern=r"\bfather\b|\bdad\b|son of"),
    _p("P25", "mother", "person", "who", "Who was the mother of {}?", "{}'s mom is", "{} was born to the mother",
       family="parent", inverse="P40", pattern=r"\bmother\b(?! tongue)|\bmom\b"),
    _p("P40", "child", "person", "who", "Who are the children of {}?", "{} is the father of", "{} is the mother of",
       "{} is the parent of", "Who is a son or daughter of {}?", family="parent", inverse="P22",
       pattern=r"\bchild\b|children of|parent of|daughter"),
    _p("P26", "spouse", "person", "who", "Who is {} married to?", "{} is married to", "Who is the wife of {}?",
       "Who is the husband of {}?", "{}'s wife is", pattern=r"spouse|married|\bwife\b|husband"),
    _p("P3373", "sibling", "person", "who", "Who is the brother of {}?", "Who is the sister of {}?", "{} is the sibling of",
       "{}'s brother is", pattern=r"sibling|brother|sister"),
    _p("P451", "unmarried partner", "person", "who", "Who is {}'s partner?", "{} is in a relationship with",
       pattern=r"partner|relationship with|dating"),
    _p("P1038", "relative", "person", "who", "Who is a relative of {}?", "{} is related to", pattern=r"relative|related to"),
    _p("P734", "family name", "person", "what", "What is {}'s surname?", "{}'s last name is", pattern=r"family name|surname|last name"),
    _p("P735", "given name", "person", "what", "What is {}'s first name?", "{}'s first name is", pattern=r"given name|first name"),
    _p("P1559", "native name", "person", "what", "What is {} called in their own language?",
       pattern=r"native language name|name in native"),
    # people: work and study
    _p("P106", "occupation", "person", "what", "What does {} do for a living?", "{} works as a", "What was {}'s career?",
       "{} is a professional", "What is {}'s profession?", pattern=r"occupation|profession|career|for a living|works as"),
    _p("P39", "position held", "person", "what", "What position did {} hold?", "{} held the office of", "Which office did {} hold?",
       pattern=r"position held|office of|held the|which office"),
    _p("P108", "employer", "person", "who", "Who employs {}?", "{} works for", "Which company does {} work for?",
       "{} is employed by", pattern=r"employ|works? for"),
    _p("P69", "educated at", "person", "where", "Where did {} study?", "{} studied at", "Which university did {} attend?",
       "The alma mater of {} is", "{} graduated from", "What is the university where {} went?",
       pattern=r"educated|alma mater|studied at|universit|college|graduated|school"),
    _p("P812", "academic major", "person", "what", "What did {} major in?", "{} majored in", pattern=r"major"),
    _p("P512", "academic degree", "person", "what", "What degree does {} hold?", "{} holds a degree of",
       pattern=r"academic degree|degree"),
    _p("P101", "field of work", "person", "what", "What field does {} work in?", "{} works in the field of",
       "{}'s expertise is in", pattern=r"field of work|field|expertise|domain"),
    _p("P166", "award", "person", "what", "What award did {} win?", "{} won the", "{} was awarded the",
       "Which prize did {} receive?", pattern=r"award|prize|won the"),
    _p("P1411", "nominated for", "person", "what", "What was {} nominated for?", "{} was nominated for", pattern=r"nominat"),
    _p("P184", "doctoral advisor", "person", "who", "Who supervised {}'s doctorate?", "{}'s PhD advisor was",
       family="doctoral", inverse="P185", pattern=r"doctoral advisor|phd advisor|supervis"),
    _p("P185", "doctoral student", "person", "who", "Whose doctorate did {} supervise?", "{} was the doctoral advisor of",
       family="doctoral", inverse="P184", pattern=r"doctoral student|advisor of"),
    _p("P1066", "student of", "person", "who", "Who taught {}?", "{} studied under", "{} was a pupil of",
       family="teacher", inverse="P802", pattern=r"student of|studied under|pupil of|taught"),
    _p("P802", "student", "person", "who", "Who did {} teach?", "{} was the teacher of", "Who was a pupil of {}?",
       family="teacher", inverse="P1066", pattern=r"teacher of|students of"),
    _p("P737", "influenced by", "person", "who", "Who influenced {}?", "{} was influenced by", "{} drew inspiration from",
       family="influence", inverse="Q-influenced", pattern=r"influenced by|inspiration"),
    _p("Q-influenced", "influence on", "person", "who", "Whom did {} influence?", "{} influenced", "{} was an influence on",
       family="influence", inverse="P737", pattern=r"influence on|influenced(?! by)"),
    _p("P463", "member of", "person", "what", "What organisation is {} a member of?", "{} is a member of",
       "{} belongs to the group", pattern=r"member of|belongs to the group"),
    _p("P102", "political party", "person", "what", "Which party does {} belong to?", "{} is a member of the party",
       "What political party is {} in?", pattern=r"party"),
    _p("P54", "sports team", "person", "what", "Which team does {} play for?", "{} plays for",
       "The name of the sports team which {} is a member of is", "What is the team that {} is associated with?",
       pattern=r"team|plays for|club"),
    _p("P413", "playing position", "person", "what", "Which position does {} play?", "{} plays in the position of",
       "{}, who plays the position", "In football, which position does {} play?", pattern=r"position (?:does|of)|plays as|plays the position|position played"),
    _p("P641", "sport", "person", "what", "Which sport does {} play?", "{} professionally plays the sport", "What sport is {} associated with?",
       pattern=r"\bsport\b"),
    _p("P118", "league", "thing", "what", "Which league does {} play in?", "{} competes in the league",
       "The name of the league which {} plays in is", pattern=r"league"),
    _p("P1303", "instrument", "person", "what", "What instrument does {} play?", "{} plays the instrument", "{} is a virtuoso on the",
       pattern=r"instrument|performs on|incredible at"),
    _p("P412", "voice type", "person", "what", "What is the vocal range of {}?", "{} sings with the voice type",
       "What type of voice does {} have?", pattern=r"voice type|vocal range|type of voice"),
    _p("P136", "genre", "work", "what", "What genre is {}?", "{} belongs to the genre", "What type of music does {} play?",
       "{} is known for the genre", pattern=r"genre|type of music|style of music"),
    _p("P264", "record label", "work", "what", "Which label released {}?", "{} was released on the label",
       "What record label is {} signed to?", pattern=r"record label|\blabel\b"),
    _p("P140", "religion", "person", "what", "What religion does {} follow?", "{} is a follower of", "What is {}'s faith?",
       "The name of the religion which {} is associated with is", pattern=r"religio|faith|follower of"),
    _p("P172", "ethnic group", "person", "what", "What ethnicity is {}?", "{} belongs to the ethnic group",
       "The name of the ethnic group which {} is associated with is", pattern=r"ethnic"),
    _p("P27", "country of citizenship", "person", "what", "Which country is {} a citizen of?", "{} is a citizen of",
       "{} holds a citizenship from", "What is {}'s nationality?", family="country",
       pattern=r"citizen|nationality"),
    _p("P103", "native language", "person", "what", "What is {}'s mother tongue?", "The mother tongue of {} is",
       "{} grew up speaking", family="language", pattern=r"native language|mother tongue|grew up speaking"),
    _p("P1412", "languages spoken", "person", "what", "Which language does {} speak?", "{} speaks the language",
       "{} speaks", "{} writes in", family="language", pattern=r"speak|spoke|writes in|language spoken|understand"),
    _p("P937", "work location", "person", "where", "Where does {} work?", "{} worked in the city of", "{} was working in",
       pattern=r"work location|worked in|working in"),
    _p("P551", "residence", "person", "where", "Where does {} live?", "{} lives in", "{} resides in", pattern=r"resid|lives in|live\?"),
    _p("P1344", "participant in", "person", "what", "What event did {} take part in?", "{} took part in", "{} participated in",
       pattern=r"participa|took part|part of the event"),
    _p("P607", "conflict", "person", "what", "Which war did {} fight in?", "{} fought in", "Which war was {} a part of?",
       pattern=r"\bwar\b|conflict|fought"),
    _p("P241", "military branch", "person", "what", "In which branch of the military did {} serve?", "{} served in the",
       pattern=r"military branch|branch|served in"),
    _p("P410", "military rank", "person", "what", "What rank did {} hold?", "{} held the military rank of", pattern=r"\brank\b"),
    _p("P800", "notable work", "person", "what", "What is {} best known for?", "{} is famous for writing", "{}'s most famous work is",
       family="authorship", inverse="P50", pattern=r"notable work|best known for|famous work|famous for"),
    _p("P1327", "business partner", "person", "who", "Who is {}'s doubles partner?",
       pattern=r"business partner|doubles partner"),
    # places
    _p("P17", "country", "place", "what", "Which country is {} in?", "{} is located in the country of", "In which country is {}?",
       "The name of the country which {} is associated with is", family="country",
       pattern=r"\bcountry\b(?! of (?:origin|citizenship))"),
    _p("P131", "administrative region", "place", "where", "Where is {} located?",
       "{} is located in", "{}, which is located in", "Which region is {} in?", "{} is in", family="country",
       pattern=r"located|is in\b|, in\b|can be found in|\bregion\b|which place"),
    _p("P30", "continent", "place", "what", "On which continent is {}?", "{} is located in the continent",
       "{} belongs to the continent of", "The name of the continent which {} is part of is", family="country",
       pattern=r"continent"),
    _p("P36", "capital", "place", "what", "What is the capital of {}?", "The capital city of {} is", "{}'s capital is",
       family="capital", inverse="P1376", pattern=r"capital(?! of)|capital city"),
    _p("P1376", "capital of", "place", "what", "{} is the capital of", "Which country has {} as its capital?",
       "The name of the country which {} is the capital of is", family="capital", inverse="P36", pattern=r"capital of|is the capital"),
    _p("P37", "official language", "place", "what", "What language is official in {}?", "The law in {} declares the language",
       "In {}, the language spoken is", family="language", pattern=r"official language|declares the language"),
    _p("P38", "currency", "place", "what", "What currency is used in {}?", "The currency of {} is", "In {}, people pay with",
       "The name of the currency in {} is", pattern=r"currency|pay with"),
    _p("P35", "head of state", "place", "who", "Who is the head of state of {}?", "The president of {} is",
       family="leader", pattern=r"head of state|president of|king|monarch"),
    _p("P6", "head of government", "place", "who", "Who leads the government of {}?", "The mayor of {} is", "The prime minister of {} is",
       family="leader", pattern=r"head of government|mayor|prime minister|governor"),
    _p("P85", "anthem", "place", "what", "What is the national anthem of {}?", "The anthem of {} is", pattern=r"anthem"),
    _p("P190", "twin city", "place", "what", "What is the twin city of {}?", "{} is a twin city of",
       "What is the sister city of {}?", pattern=r"twin|sister city"),
    _p("P47", "shares border with", "place", "what", "Which places border {}?", "{} borders", "{} shares a border with",
       pattern=r"border"),
    _p("P1082", "population", "place", "what", "How many people live in {}?", "The number of inhabitants of {} is",
       pattern=r"population|inhabitants|how many people"),
    _p("P2046", "area", "place", "what", "How large is {}?", "{} covers an area of", pattern=r"\barea\b|how large"),
    _p("P2044", "elevation", "place", "what", "How high is {}?", "{} lies at an elevation of",
       pattern=r"elevation|how high|altitude"),
    _p("P206", "body of water", "place", "what", "Which river flows through {}?", "{} lies on the river",
       "On which lake is {}?", pattern=r"river|lake|body of water|sea\b"),
    _p("P421", "time zone", "place", "what", "What time zone is {} in?", "{} keeps the time zone", pattern=r"time zone"),
    _p("P2936", "language used", "place", "what", "What language do people use in {}?", "In {}, they understand",
       family="language", pattern=r"language used|language of|language"),
    _p("P610", "highest point", "place", "what", "What is the highest point of {}?", "The tallest peak in {} is",
       pattern=r"highest point|tallest peak|summit"),
    _p("P1830", "owner of", "org", "what", "What does {} own?", "{} is the owner of", "Which company is owned by {}?",
       family="ownership", inverse="P127", pattern=r"owner of|does .* own"),
    _p("P127", "owned by", "org", "who", "Who owns {}?", "{} is owned by", "{} belongs to the company",
       family="ownership", inverse="P1830", pattern=r"owned by|who owns|owner\b"),
    _p("P749", "parent organization", "org", "what", "What is the parent company of {}?", "{} is a subsidiary of",
       family="subsidiary", inverse="P355", pattern=r"parent (?:company|organi)|subsidiary of"),
    _p("P355", "subsidiary", "org", "what", "What subsidiaries does {} have?", "{} is the parent company of",
       family="subsidiary", inverse="P749", pattern=r"subsidiar(?:y|ies)(?! of)|parent company of"),
    # organisations
    _p("P112", "founded by", "org", "who", "Who founded {}?", "{} was founded by", "{} was started by", "The founder of {} is",
       pattern=r"found(?:ed|er)|started by|establish(?:ed)? by"),
    _p("P571", "inception", "org", "when", "When was {} founded?", "{} was established in the year", "When was {} established?",
       "What year was {} created?", pattern=r"inception|when was .*(?:establish|found|creat|form)|year .*(?:creat|establish|start)"),
    _p("P576", "dissolution date", "org", "when", "When was {} dissolved?", "{} was abolished in",
       pattern=r"dissolved|abolished|demolished"),
    _p("P159", "headquarters location", "org", "where", "Where is {} headquartered?", "The headquarters of {} are in",
       "{} is based in", family="country", pattern=r"headquarter|based in"),
    _p("P740", "location of formation", "org", "where", "Where was {} formed?", "{} was founded in the city of",
       "{} was formed in", family="country", pattern=r"formed in|formation|founded in"),
    _p("P452", "industry", "org", "what", "What industry is {} in?", "{} operates in the industry of", pattern=r"industry|sector"),
    _p("P1128", "employees", "org", "what", "How many people work at {}?", "The number of employees of {} is",
       pattern=r"employees|how many people work"),
    _p("P169", "chief executive officer", "org", "who", "Who is the CEO of {}?", "{} is run by", "The chief executive of {} is",
       pattern=r"\bceo\b|chief executive|run by"),
    _p("P488", "chairperson", "org", "who", "Who chairs {}?", "The chairman of {} is", pattern=r"chair"),
    _p("P176", "manufacturer", "thing", "what", "Which company makes {}?", "{} is produced by", "{} is a product of",
       "What is the product made by {}?", "Who manufactures {}?", family="maker",
       pattern=r"manufactur|produced by|product|made by|\bmakes?\b"),
    _p("P178", "developer", "thing", "what", "Who developed {}?", "{} is developed by", "{}, developed by", family="maker",
       pattern=r"develop"),
    _p("P1056", "main product", "org", "what", "What does {} produce?", "{} manufactures", family="maker",
       pattern=r"does .* produce|manufactures"),
    # works
    _p("P50", "author", "work", "who", "Who wrote {}?", "{} was written by", "The writer of {} is",
       family="authorship", inverse="P800", pattern=r"author|written by|wrote|writer"),
    _p("P57", "director", "work", "who", "Who directed {}?", "{} was directed by", "Who had the role of director in {}?",
       pattern=r"direct"),
    _p("P162", "producer", "work", "who", "Who produced {}?", "{} was produced by", pattern=r"producer|produced\b"),
    _p("P58", "screenwriter", "work", "who", "Who wrote the screenplay of {}?", "The script of {} was written by",
       pattern=r"screenwriter|screenplay|script"),
    _p("P86", "composer", "work", "who", "Who composed {}?", "The music of {} was composed by", "{} was composed by",
       pattern=r"compos"),
    _p("P161", "cast member", "work", "who", "Who starred in {}?", "{} stars", "Who has acted in the film {}?",
       "The names of the cast members of {} are", pattern=r"cast|starr?|acted in|actor"),
    _p("P175", "performer", "work", "who", "Who performed {}?", "{} was performed by", "{} is a song by",
       pattern=r"perform|song by|sung by|singer"),
    _p("P170", "creator", "work", "who", "Who created {}?", "{} was created by", "{}, created by", "Who is the creator of {}?",
       family="authorship", pattern=r"creat"),
    _p("P123", "publisher", "work", "what", "Who published {}?", "{} was published by", pattern=r"publish"),
    _p("P449", "original broadcaster", "work", "what", "Which network first aired {}?", "{} premiered on", "{} was originally aired on",
       "On what channel did {} first appear?", pattern=r"network|aired|broadcast|channel|premiered"),
    _p("P364", "original language", "work", "what", "What language was {} made in?",
       "The original language of {} is", "The language of {} was", family="language", pattern=r"original language"),
    _p("P495", "country of origin", "work", "what", "Which country does {} come from?", "{} originated in the country",
       "What country did {} originate?", "{}, created in", family="country", pattern=r"country of origin|originat|come from|\bfrom\b"),
    _p("P577", "publication date", "work", "when", "When was {} released?", "{} was first published in", "In what year did {} come out?",
       pattern=r"publication date|released|came out|come out|published in"),
    _p("P155", "follows", "work", "what", "What came before {}?", "{} follows", "{} is the sequel to", "{} comes after",
       family="sequence", inverse="P156", pattern=r"\bfollows\b|came before|preceded|sequel to|comes after"),
    _p("P156", "followed by", "work", "what", "What came after {}?", "{} is followed by", "The sequel to {} is", "{} comes before",
       family="sequence", inverse="P155", pattern=r"followed by|came after|succeeded|sequel of|comes before|next"),
    _p("P1365", "replaces", "org", "what", "What did {} replace?", "{} replaced", "{} took the place of",
       family="replacement", inverse="P1366", pattern=r"\breplaces?\b|replaced(?! by)|took the place"),
    _p("P1366", "replaced by", "org", "what", "What replaced {}?", "{} was replaced by", "{} was superseded by",
       family="replacement", inverse="P1365", pattern=r"replaced by|superseded"),
    _p("P361", "part of", "thing", "what", "What is {} part of?", "{} is a part of", "{} belongs to", "Which series is {} from?",
       family="partof", inverse="P527", pattern=r"part of|belongs to|series"),
    _p("P527", "has part", "thing", "what", "What parts does {} have?", "{} consists of", "{} includes", "{} is made up of",
       family="partof", inverse="P361", pattern=r"has part|consists|includes|made up of|components"),
    _p("P921", "main subject", "work", "what", "What is {} about?", "The topic of {} is", "{} deals with", pattern=r"main subject|about\?|topic"),
    _p("P144", "based on", "work", "what", "What is {} based on?", "{} is an adaptation of", "{} was adapted from",
       pattern=r"based (?:on|upon)|adapt"),
    _p("P674", "characters", "work", "who", "Which characters appear in {}?", "A character in {} is", pattern=r"character"),
    _p("P840", "narrative location", "work", "where", "Where is {} set?", "The story of {} takes place in", pattern=r"set\?|takes place|narrative"),
    _p("P1433", "published in", "work", "what", "In which journal did {} appear?", "{} was published in the journal",
       pattern=r"journal|published in the|magazine"),
    _p("P407", "language of the text", "work", "what", "What language is {} written in?", "{} is written in the language",
       family="language", pattern=r"language of work|written in the language"),
    # things
    _p("P171", "parent taxon", "thing", "what", "What is the parent taxon of {}?", "{} belongs to the genus",
       "Which family does {} belong to?", family="taxon", pattern=r"taxon|genus|family does|belong to the family"),
    _p("P105", "taxon rank", "thing", "what", "What is the taxonomic rank of {}?", "The rank of {} in taxonomy is",
       family="taxon", pattern=r"taxon(?:omic)? rank|rank of"),
    _p("P59", "constellation", "thing", "what", "In which constellation is {}?", "{} is a star in the constellation",
       "What constellation is home to {}?", pattern=r"constellation"),
    _p("P186", "made from material", "thing", "what", "What is {} made of?", "{} is built from", "What material was used for {}?",
       pattern=r"material|made of|built from"),
    _p("P279", "subclass of", "thing", "what", "What kind of thing is {}?", "{} is a type of", "{} is a kind of",
       family="class", pattern=r"subclass|type of|kind of"),
    _p("P31", "instance of", "thing", "what", "What is {}?", "{} is an example of", "{} is an instance of", family="class",
       pattern=r"instance of|example of"),
    _p("P366", "use", "thing", "what", "What is {} used for?", "{} is used for", "The purpose of {} is", pattern=r"used for|purpose|\buse\b"),
    _p("P138", "named after", "thing", "what", "Who is {} named after?", "{} is named for", "{} was named after",
       pattern=r"named (?:after|for)|called after"),
    _p("P84", "architect", "thing", "who", "Who designed {}?", "The architect of {} is", "Who was responsible for the design of {}?",
       pattern=r"architect|design"),
    _p("P149", "architectural style", "thing", "what", "What architectural style is {}?", "{} is built in the style of",
       pattern=r"architectural style|style of"),
    _p("P137", "operator", "thing", "who", "Who operates {}?", "{} is operated by", pattern=r"operat"),
    _p("P81", "connecting line", "thing", "what", "Which railway line serves {}?", "{} is a station on the line",
       pattern=r"railway|station|\bline\b"),
    _p("P516", "powered by", "thing", "what", "What engine powers {}?", "{} is powered by", pattern=r"powered|engine"),
    _p("P113", "airline hub", "org", "what", "Which airport is the hub of {}?", "{} has its hub at", pattern=r"airport|\bhub\b"),
    _p("P289", "vessel class", "thing", "what", "What class of ship is {}?", "{} is a ship of the class",
       "What specific type of seafaring vessel was {}?", pattern=r"vessel|ship"),
    _p("P575", "discovery date", "thing", "when", "When was {} discovered?", "{} was discovered in",
       pattern=r"discover|invent"),
    _p("P61", "discoverer", "thing", "who", "Who discovered {}?", "{} was invented by", pattern=r"discoverer|inventor|invented by|who discovered"),
    _p("P2067", "mass", "thing", "what", "How heavy is {}?", "{} weighs", pattern=r"\bmass\b|weigh|heavy"),
)

BY_PID = {p.pid: p for p in PROPERTIES}
AMBIGUOUS_FAMILIES = ("country", "language", "class", "maker", "authorship", "leader", "taxon")


def inverse_of(a: Property, b: Property) -> bool:
    """Whether b asks a's link from the other end (either way)."""
    return a.inverse == b.pid or b.inverse == a.pid


def property_of_template(template: str) -> Property | None:
    """The property whose pattern matches a data set's template (subject as "{}") over the longest
    span ("When was {} born?" is a date of birth, not a place), else None."""
    text = template.lower().replace("{}", " ")
    best, length = None, 0
    for prop in PROPERTIES:
        found = re.search(prop.pattern, text) if prop.pattern else None
        if found and found.end() - found.start() > length:
            best, length = prop, found.end() - found.start()
    return best
